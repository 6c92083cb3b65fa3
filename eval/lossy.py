"""The WER–speed curve of the lossy settings (issue #21): every documented setting against
lossless, in one process, interleaved file by file after a warm-up.

    lossless          β = 0, τ = 0 (the default): token-identical to greedy
    τ = −1, −2, −4    the paper's energy test at that floor (β = 0)
    β = 0.5, τ = −4   the same with the EMA over slots

Every lossy setting runs with the loop's guards: an end-of-text and a draft that completes a
repeated span pass only by the exact test (`acceptance.repeats`).

Two sets of audio: the long-form files of eval/longform.py (train-clean-5 chapters of speakers
the shipped adapters never trained on, joined) and the short test-clean clips. Reported per
setting: WER (Whisper's English normaliser + jiwer), tokens per forward, decode seconds (the
loop's own timer, summed) and their ratio against lossless, the share of files whose words
differ from lossless and the word changes against lossless (WER with lossless as reference).

    python eval/lossy.py --model tiny.en --max-minutes 6 --output eval/lossy-tiny.en-cpu.json --plot eval/lossy-tiny.en-cpu.png

The timestamp equivalence tried on 2026-12-01 (a drafted segment boundary passes where the
control finds one likely) ran with this script at commit e7b0ccd: eval/lossy-*-timestamps-cpu.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import DEFAULT_DATA, REPO_TEST_CLEAN, find_librispeech, machine_info
from longform import joined_chapters

import crosswhisper
from crosswhisper.audio import load_audio
from crosswhisper.metrics import normalize_text, word_error_rate
from crosswhisper.whisper import get_bundle

SETTINGS = {
    "lossless": {},
    "tau=-1": {"tau": -1.0},
    "tau=-2": {"tau": -2.0},
    "tau=-4": {"tau": -4.0},
    "beta=0.5, tau=-4": {"beta": 0.5, "tau": -4.0},
}


def curve(bundle, files, settings: dict) -> dict:
    """Per setting: WER, tokens per forward, decode seconds and changed files over `files`."""
    rows = {name: {"hypotheses": {}, "tokens": 0, "calls": 0, "decode_seconds": 0.0} for name in settings}
    for name_file, audio, _ in files:
        for name, kwargs in settings.items():  # interleaved: the same machine state per file
            result = crosswhisper.transcribe(audio, model=bundle, **kwargs)
            row = rows[name]
            row["hypotheses"][name_file] = result.text
            row["tokens"] += result.stats.generated_tokens
            row["calls"] += result.stats.forward_calls
            row["decode_seconds"] += result.stats.decode_seconds
    references = [reference for _, _, reference in files]
    lossless = rows["lossless"]
    report = {}
    for name, row in rows.items():
        hypotheses = [row["hypotheses"][file] for file, _, _ in files]
        report[name] = {
            "settings": settings[name],
            "wer": word_error_rate(references, hypotheses),
            "tokens_per_forward": row["tokens"] / row["calls"],
            "tokens_per_forward_vs_lossless": (row["tokens"] / row["calls"]) / (lossless["tokens"] / lossless["calls"]),
            "decode_seconds": row["decode_seconds"],
            "decode_speed_vs_lossless": lossless["decode_seconds"] / row["decode_seconds"],
            # words, not strings: a moved segment boundary changes punctuation and casing only
            "changed_files": sum(
                normalize_text(row["hypotheses"][f]) != normalize_text(lossless["hypotheses"][f]) for f, _, _ in files
            ) / len(files),
            "word_changes_vs_lossless": word_error_rate(
                [lossless["hypotheses"][f] for f, _, _ in files], [row["hypotheses"][f] for f, _, _ in files]
            ),
        }
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["sets"]), figsize=(5.5 * len(report["sets"]), 4.5), dpi=120, layout="constrained")
    for ax, (set_name, rows) in zip(axes if len(report["sets"]) > 1 else [axes], report["sets"].items()):
        at: dict = {}  # settings that land on one point share a label
        for name, row in rows.items():
            point = (round(row["tokens_per_forward"], 3), round(100 * row["wer"], 2))
            at.setdefault(point, []).append(f"{name} ({row['decode_speed_vs_lossless']:.2f}× decode)")
        for i, ((x, y), names) in enumerate(sorted(at.items(), key=lambda item: (item[0][1], item[0][0]))):
            ax.scatter(x, y, s=60, color="tab:green" if any(n.startswith("lossless") for n in names) else "tab:red")
            # in order of WER, labels alternate above and below their point: close ones do not overlap
            ax.annotate("\n".join(names), (x, y), fontsize=7, xytext=(4, 5 if i % 2 == 0 else -14), textcoords="offset points")
        ax.set_xlabel("tokens per forward (→ faster)")
        ax.set_ylabel("WER %  (↓ better)")
        ax.set_title(set_name, fontsize=9)
        ax.grid(True, alpha=0.3)
    machine = report["machine"]
    fig.suptitle(f"Whisper {report['model']}, lossy settings, γ = {report['gamma']} — "
                 f"{machine['cpu_model'] or machine['machine']}", fontsize=10)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA.parent / "train-clean-5", help="long-form chapters")
    parser.add_argument("--speakers", nargs="*", default=["1088", "3526"], help="held out by the shipped adapters")
    parser.add_argument("--max-minutes", type=float, default=6.0)
    parser.add_argument("--chapter-seconds", type=float, default=300.0)
    parser.add_argument("--test-clean", type=Path, default=DEFAULT_DATA if DEFAULT_DATA.exists() else REPO_TEST_CLEAN)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--output", type=Path, default=Path("results/lossy.json"))
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--replot", type=Path, help="only draw --plot from this earlier --output JSON")
    args = parser.parse_args(argv)
    if args.replot:
        if not args.plot:
            parser.error("--replot needs --plot")
        plot(json.loads(args.replot.read_text()), args.plot)
        return 0
    torch.set_num_threads(min(2, torch.get_num_threads()))

    bundle = get_bundle(args.model)
    settings = {name: SETTINGS[name] for name in ["lossless"] + [s for s in args.settings if s != "lossless"]}
    long_files = joined_chapters(args.data, args.speakers, args.max_minutes * 60, args.chapter_seconds)
    clips = [(utterance, load_audio(path), text) for utterance, path, text in find_librispeech(args.test_clean)]
    crosswhisper.transcribe(clips[0][1], model=bundle)  # warm-up: kernels timed, adapter read
    report = {
        "model": args.model,
        "gamma": crosswhisper.TranscribeOptions().decode_options("cpu").gamma,
        "machine": machine_info("cpu"),
        "sets": {
            f"long-form, {len(long_files)} files, {sum(len(a) for _, a, _ in long_files) / 16000 / 60:.1f} min": curve(bundle, long_files, settings),
            f"test-clean, {len(clips)} clips": curve(bundle, clips, settings),
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    for set_name, rows in report["sets"].items():
        print(f"\n{set_name}\n| setting | WER % | tokens/fwd | × lossless | decode × lossless "
              "| files with other words | words ≠ lossless |\n|---|---:|---:|---:|---:|---:|---:|")
        for name, row in rows.items():
            print(f"| {name} | {100 * row['wer']:.2f} | {row['tokens_per_forward']:.2f} | {row['tokens_per_forward_vs_lossless']:.2f} "
                  f"| {row['decode_speed_vs_lossless']:.2f} | {100 * row['changed_files']:.0f} % | {100 * row['word_changes_vs_lossless']:.1f} % |")
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

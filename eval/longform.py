"""Long-form evaluation (issue #17): each chapter's utterances joined in order (0.5 s pauses) into
one long file, transcribed by every system in one process, side by side:

    transformers   `generate(return_timestamps=True)` over the whole file: the sequential
                   long-form reference (the exactness reference; its WER is the target)
    own loop       `crosswhisper.transcribe(gamma=0)`: our loop without drafts
    crosswhisper   `crosswhisper.transcribe()`: the shipped adapter, lossless
    faster-whisper float32 / int8, the same CTranslate2 weights, greedy (`beam_size=1`), its own
                   long-form algorithm and defaults otherwise

All with temperature fallback as each system's default (0.0, 0.2, … 1.0), condition on previous
text on. Reported per system: WER (Whisper's English normaliser + jiwer), RTFx (audio seconds /
wall seconds, end to end after loading), tokens per decoder forward, and token mismatches
against the transformers reference. Systems run interleaved file by file after a warm-up, so
the ratios come from one process on the same machine state.

    python eval/longform.py --model tiny.en --data ../shared/data/LibriSpeech/train-clean-5 \
        --speakers 1088 3526 --max-minutes 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import DEFAULT_DATA, EvalError, find_librispeech, machine_info
from faster_whisper_worker import Worker

import crosswhisper
from crosswhisper.audio import SAMPLE_RATE, load_audio
from crosswhisper.metrics import word_error_rate
from crosswhisper.whisper import bundled_model_dir, get_bundle
from crosswhisper.whisper.loading import COMPUTE_TYPES

GAP_SECONDS = 0.5  # silence between joined utterances


def joined_chapters(
    data: Path, speakers, max_seconds: float, chapter_seconds: float = float("inf")
) -> list[tuple[str, np.ndarray, str]]:
    """(speaker-chapter, audio, reference) per chapter, utterances in order (at most
    chapter_seconds of each chapter), until max_seconds in all."""
    chapters: dict[str, list] = {}
    for utterance, path, text in find_librispeech(data):
        speaker, chapter, _ = utterance.split("-")
        if speakers and speaker not in speakers:
            continue
        chapters.setdefault(f"{speaker}-{chapter}", []).append((utterance, path, text))
    files, total = [], 0.0
    gap = np.zeros(int(GAP_SECONDS * SAMPLE_RATE), dtype=np.float32)
    for name in sorted(chapters):
        pieces, texts = [], []
        for _, path, text in sorted(chapters[name]):
            if sum(len(p) for p in pieces) >= chapter_seconds * SAMPLE_RATE:
                break
            pieces += [load_audio(path), gap]
            texts.append(text)
        audio = np.concatenate(pieces[:-1])
        files.append((name, audio, " ".join(texts)))
        total += len(audio) / SAMPLE_RATE
        if total >= max_seconds:
            break
    return files


def transformers_long_form(bundle, audio: np.ndarray, temperatures) -> tuple[str, list[int], int]:
    """transformers' sequential long-form generate with its defaults as openai-whisper's."""
    features = bundle.feature_extractor(
        audio, sampling_rate=SAMPLE_RATE, truncation=False, padding="longest", return_attention_mask=True,
        return_tensors="pt",
    )
    calls = 0

    def count(*_):
        nonlocal calls
        calls += 1

    handle = bundle.model.get_decoder().register_forward_pre_hook(count)
    try:
        with torch.inference_mode():
            out = bundle.model.generate(
                features.input_features, attention_mask=features.attention_mask, return_timestamps=True,
                return_segments=True, condition_on_prev_tokens=True, temperature=temperatures,
                compression_ratio_threshold=2.4, logprob_threshold=-1.0, no_speech_threshold=0.6,
            )
    finally:
        handle.remove()
    tokens = out["sequences"][0].tolist()
    eot = bundle.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = bundle.tokenizer.decode([t for t in tokens if t < eot]).strip()
    return text, tokens, calls


def plot(report: dict, path: Path) -> None:
    """WER % against RTFx per system (top axis: speed-up over transformers' long-form generate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from report import _place_labels

    systems = report["systems"]
    reference = systems["transformers long-form generate"]["rtfx"]
    fig, ax = plt.subplots(figsize=(9.5, 6), dpi=120, layout="constrained")
    points, labels, colors = [], [], []
    for name, row in systems.items():
        color = ("black" if name.startswith("transformers") else "tab:orange" if name.startswith("faster")
                 else "tab:blue" if "gamma=0" in name else "tab:green")
        ax.scatter(row["rtfx"], 100 * row["wer"], s=70, color=color, zorder=3, edgecolors="white", linewidths=0.5)
        extra = f"\n{row['tokens_per_forward']:.2f} tok/fwd" if row.get("tokens_per_forward") and row["tokens_per_forward"] > 1 else ""
        points.append((row["rtfx"], 100 * row["wer"]))
        labels.append(name + extra)
        colors.append(color)
    ax.axvline(reference, color="black", lw=0.6, ls=":", zorder=1)
    top = ax.secondary_xaxis("top", functions=(lambda x: x / reference, lambda s: s * reference))
    top.set_xlabel("end-to-end speed-up vs transformers long-form generate, same run")
    ax.set_xlabel("RTFx = audio seconds / end-to-end seconds   (→ faster)")
    ax.set_ylabel("WER %   (↓ better)")
    ax.set_ylim(0, max(y for _, y in points) * 1.3 + 0.5)
    xs = [x for x, _ in points]
    ax.set_xlim(min(xs) * 0.8, max(xs) * 1.25)
    ax.grid(True, alpha=0.3)
    m = report["machine"]
    fig.suptitle(f"Whisper {report['model']}, long-form: {len(report['files'])} joined chapters, "
                 f"{report['audio_seconds'] / 60:.1f} min — {m['cpu_model'] or m['machine']}, {m['torch_threads']} threads",
                 fontsize=10)
    fig.canvas.draw()
    _place_labels(ax, points, labels, colors)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA.parent / "train-clean-5")
    parser.add_argument("--speakers", nargs="*", default=["1088", "3526"], help="held out by the shipped adapters")
    parser.add_argument("--max-minutes", type=float, default=20.0)
    parser.add_argument("--chapter-seconds", type=float, default=float("inf"), help="first utterances of each chapter only")
    parser.add_argument("--compute-types", nargs="*", default=["float32", "int8"], help="faster-whisper rows")
    parser.add_argument("--gammas", nargs="*", type=int, default=[], help="extra lossless rows at these draft sizes")
    parser.add_argument(
        "--our-compute-types", nargs="*", default=[], choices=[ct for ct in COMPUTE_TYPES if ct != "float32"],
        help="also our own loop and lossless at these compute types (their exactness reference: our own loop at the same type)",
    )
    parser.add_argument("--output", type=Path, default=Path("results/longform.json"))
    parser.add_argument(
        "--fallback", action=argparse.BooleanOptionalAction, default=True,
        help="temperature fallback 0.0, 0.2, … 1.0 (default); --no-fallback: greedy only, where lossless "
        "decoding must match the reference token for token",
    )
    parser.add_argument("--plot", type=Path, help="also draw WER against RTFx per system into this PNG")
    parser.add_argument("--replot", type=Path, help="only draw --plot from this earlier --output JSON")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.plot or args.replot.with_suffix(".png"))
        return 0
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: not found (pass --data, a LibriSpeech subset)")
    files = joined_chapters(args.data, set(args.speakers), args.max_minutes * 60, args.chapter_seconds)
    if not files:
        raise EvalError(f"no chapters of speakers {args.speakers} under {args.data}")
    audio_seconds = sum(len(a) for _, a, _ in files) / SAMPLE_RATE
    print(f"{len(files)} files, {audio_seconds / 60:.1f} min of audio")
    bundle = get_bundle(args.model)
    temperatures = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) if args.fallback else (0.0,)

    # faster-whisper in a process of its own: once CTranslate2 has run in a process, torch's
    # calls there are slower (eval/batched.py measured 43.7 → 35.0 audio s/s)
    ct2 = {ct: Worker(bundled_model_dir(args.model), ct, "cpu", torch.get_num_threads()) for ct in args.compute_types}

    def ours(**kwargs):
        def run(audio):
            result = crosswhisper.transcribe(audio, model=bundle, temperature=temperatures, seed=0, **kwargs)
            return result.text, list(result.tokens), result.stats.forward_calls, result.stats.generated_tokens
        return run

    def transformers_run(audio):
        text, tokens, calls = transformers_long_form(bundle, audio, temperatures)
        return text, tokens, calls, None

    def faster_whisper(worker):
        def run(audio):
            _, texts, seconds = worker.transcribe(
                audio, beam_size=1, temperature=list(temperatures), language="en" if args.model.endswith(".en") else None
            )
            return " ".join(text.strip() for text in texts), None, None, None, seconds  # the worker times itself
        return run

    systems = {"transformers long-form generate": transformers_run, "crosswhisper own loop (gamma=0)": ours(gamma=0),
               "crosswhisper lossless (shipped adapter)": ours()}
    systems.update({f"crosswhisper lossless gamma={g}": ours(gamma=g) for g in args.gammas})
    # at another compute type the tokens are compared with our own loop at that type
    exactness_reference = {}
    for ct in args.our_compute_types:
        loop, drafted = f"crosswhisper own loop (gamma=0) {ct}", f"crosswhisper lossless (shipped adapter) {ct}"
        systems.update({loop: ours(gamma=0, compute_type=ct), drafted: ours(compute_type=ct)})
        systems.update({f"crosswhisper lossless gamma={g} {ct}": ours(gamma=g, compute_type=ct) for g in args.gammas})
        exactness_reference.update({name: loop for name in systems if name.endswith(f" {ct}")})
        exactness_reference[loop] = None
    systems.update({f"faster-whisper {ct}": faster_whisper(m) for ct, m in ct2.items()})
    warm = files[0][1][: 35 * SAMPLE_RATE]
    for run in systems.values():  # warm-up: first calls allocate, time kernels, load adapters
        run(warm)

    rows = {name: {"seconds": 0.0, "texts": [], "tokens": [], "calls": 0, "generated": 0} for name in systems}
    for name_file, audio, _ in files:
        for name, run in systems.items():  # interleaved, file by file
            started = time.perf_counter()
            text, tokens, calls, generated, *timed = run(audio)
            row = rows[name]
            row["seconds"] += timed[0] if timed else time.perf_counter() - started
            row["texts"].append(text)
            row["tokens"].append(tokens)
            row["calls"] += calls or 0
            row["generated"] += generated or 0
        print(f"{name_file}: done")

    references = [reference for _, _, reference in files]
    report = {"model": args.model, "fallback": args.fallback, "files": [n for n, _, _ in files], "audio_seconds": audio_seconds,
              "machine": machine_info("cpu"), "systems": {}}
    print("\n| system | WER % | RTFx | tokens / forward | mismatched files vs transformers (*: vs our own loop at that compute type) |"
          "\n|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        wer = word_error_rate(references, row["texts"])
        mismatched, against = None, exactness_reference.get(name, "transformers long-form generate")
        if row["tokens"][0] is not None and against is not None and name != against:
            # transformers' sequences hold the tokens of every segment: compare those
            mismatched = sum(a != b for a, b in zip(row["tokens"], rows[against]["tokens"]))
        per_forward = row["generated"] / row["calls"] if row["generated"] else None
        report["systems"][name] = {"wer": wer, "rtfx": audio_seconds / row["seconds"], "seconds": row["seconds"],
                                   "tokens_per_forward": per_forward, "mismatched_files": mismatched,
                                   "mismatches_against": against if mismatched is not None else None}
        print(f"| {name} | {100 * wer:.2f} | {audio_seconds / row['seconds']:.1f} | "
              f"{'' if per_forward is None else f'{per_forward:.2f}'} | "
              f"{'' if mismatched is None else mismatched}{'*' if name in exactness_reference and mismatched is not None else ''} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

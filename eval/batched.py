"""Batched transcription (issue #19): throughput against batch size and against the peers, one process.

Two parts, each on held-out speakers (train-clean-5 1088 and 3526, which the shipped adapters
never trained on):

    utterances   N short utterances (default 40), each its own input: crosswhisper
                 `transcribe_batch` at batch sizes 1, 4, 8, 16 (lossless, the shipped adapter)
                 and our own loop (γ = 0) at the largest, transformers' batched `generate`
                 (`return_timestamps=True`, greedy, the same padded features) at batch 1 and 8
    long files   each chapter's utterances joined (0.5 s pauses, as eval/longform.py): crosswhisper
                 batched (VAD chunks) at batch 1 and 8 (and 8 with γ = 3), faster-whisper's `BatchedInferencePipeline`
                 at batch 8 (float32 and int8, `beam_size=1`, timestamps on like ours), and
                 crosswhisper's sequential `transcribe()` for context

Reported per system: throughput (audio seconds per wall second, end to end after loading:
reading excluded, voice activity detection included), WER (Whisper's normaliser + jiwer),
tokens per decoder forward, and for crosswhisper the inputs whose tokens differ from batch 1
(0 expected: each row is decoded exactly as alone). Systems run interleaved, `--rounds` times,
after a warm-up.

    python eval/batched.py --model tiny.en --data ../shared/data/LibriSpeech/train-clean-5
    python eval/batched.py --model base --device cuda --dtype float16 --compute-types float16 \
        --batch-sizes 1 8 16 --long-batch-size 16 --output eval/batched-base-gpu.json   # a lent GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import DEFAULT_DATA, load_local, machine_info
from faster_whisper_worker import Worker
from longform import joined_chapters

from crosswhisper.audio import SAMPLE_RATE
from crosswhisper.metrics import word_error_rate
from crosswhisper.whisper import bundled_model_dir, get_bundle, transcribe
from crosswhisper.whisper.batched import transcribe_batch


def transformers_batched(bundle, batch_size: int):
    """transformers' batched `generate` over the inputs' features (each ≤ 30 s, padded), greedy,
    with timestamps; returns the texts."""

    def run(audios):
        texts = []
        eot = bundle.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        for first in range(0, len(audios), batch_size):
            group = audios[first : first + batch_size]
            features = bundle.feature_extractor(group, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
            features = features.to(bundle.model.device)
            with torch.inference_mode():
                out = bundle.model.generate(features, return_timestamps=True)
            texts += [bundle.tokenizer.decode([t for t in row.tolist() if t < eot]).strip() for row in out]
        return texts, None, None
    return run


def ours(bundle, batch_size: int, **kwargs):
    def run(audios):
        results = transcribe_batch(audios, model=bundle, batch_size=batch_size, temperature=0.0,
                                   device=str(bundle.model.device), **kwargs)
        calls = sum(r.stats.forward_calls for r in results)
        generated = sum(r.stats.generated_tokens for r in results)
        return [r.text for r in results], [list(r.tokens) for r in results], (generated, calls)
    return run


def sequential(bundle):
    def run(audios):
        results = [transcribe(audio, model=bundle, temperature=0.0, device=str(bundle.model.device)) for audio in audios]
        calls = sum(r.stats.forward_calls for r in results)
        generated = sum(r.stats.generated_tokens for r in results)
        return [r.text for r in results], None, (generated, calls)
    return run


def faster_whisper_batched(model_name: str, compute_type: str, batch_size: int, threads: int, device: str = "cpu"):
    """faster-whisper's `BatchedInferencePipeline` (greedy, timestamps on like ours), in a
    process of its own (eval/faster_whisper_worker.py): once CTranslate2 has run in a process,
    torch's calls there are slower (measured: crosswhisper batch 8 on the long files 43.7 →
    35.0 audio s/s after one faster-whisper call), which no user running one of them sees.
    The worker times its own calls; the systems still alternate in time."""
    worker = Worker(bundled_model_dir(model_name), compute_type, device, threads, batch_size=batch_size)
    options = dict(beam_size=1, without_timestamps=False, language="en" if model_name.endswith(".en") else None)

    def run(audios):
        texts, seconds = [], 0.0
        for audio in audios:
            _, segment_texts, took = worker.transcribe(audio, **options)
            texts.append(" ".join(text.strip() for text in segment_texts))
            seconds += took
        return texts, None, None, seconds
    return run


def measure(systems: dict, audios: list, references: list, rounds: int, exact_against: dict) -> dict:
    for run in systems.values():  # warm-up: first calls allocate, time kernels, load adapters
        run(audios[:2])
    rows = {name: {"seconds": 0.0} for name in systems}
    names = list(systems)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:  # interleaved, rotated
            started = time.perf_counter()
            texts, tokens, counts, *timed = systems[name](audios)  # (a worker process times itself)
            rows[name]["seconds"] += timed[0] if timed else time.perf_counter() - started
            rows[name].update(texts=texts, tokens=tokens, counts=counts)
    seconds = sum(len(a) for a in audios) / SAMPLE_RATE * rounds
    report = {}
    for name, row in rows.items():
        against = exact_against.get(name)
        mismatched = None
        if against is not None and row["tokens"] is not None:
            mismatched = sum(a != b for a, b in zip(row["tokens"], rows[against]["tokens"]))
        counts = row["counts"]
        report[name] = {
            "throughput": seconds / row["seconds"], "seconds": row["seconds"] / rounds,
            "wer": word_error_rate(references, row["texts"]),
            "tokens_per_forward": counts[0] / counts[1] if counts else None,
            "mismatched_inputs": mismatched, "mismatches_against": against if mismatched is not None else None,
        }
    return report


def table(title: str, report: dict, baseline: str) -> str:
    lines = [f"\n{title}\n", "| system | audio s / s | × " + baseline + " | WER % | tokens / forward | inputs ≠ batch 1 |",
             "|---|---:|---:|---:|---:|---:|"]
    base = report[baseline]["throughput"]
    for name, row in report.items():
        tpf = "" if row["tokens_per_forward"] is None else f"{row['tokens_per_forward']:.2f}"
        mm = "" if row["mismatched_inputs"] is None else str(row["mismatched_inputs"])
        lines.append(f"| {name} | {row['throughput']:.1f} | {row['throughput'] / base:.2f} | {100 * row['wer']:.2f} | {tpf} | {mm} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA.parent / "train-clean-5")
    parser.add_argument("--speakers", nargs="*", default=["1088", "3526"], help="held out by the shipped adapters")
    parser.add_argument("--utterances", type=int, default=40, help="short inputs of the first part (0: skip it)")
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--long-minutes", type=float, default=20.0, help="audio of the second part (0: skip it)")
    parser.add_argument("--long-batch-size", type=int, default=8, help="the batch of the second part (GPU: 16)")
    parser.add_argument("--compute-types", nargs="*", default=["float32", "int8"], help="faster-whisper rows")
    parser.add_argument("--our-compute-types", nargs="*", default=[], choices=["bfloat16", "int8"],
                        help="also our batch 1 and batched rows of the long files at these compute types")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (every system on it)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="our weights' dtype (GPU: float16)")
    parser.add_argument("--output", type=Path, default=Path("results/batched.json"))
    args = parser.parse_args(argv)
    bundle = get_bundle(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    report = {"model": args.model, "machine": machine_info(args.device), "rounds": args.rounds}

    if args.utterances:
        utterances = load_local(args.data, args.speakers, args.utterances)
        audios = [u.audio for u in utterances]
        references = [u.reference for u in utterances]
        top = max(args.batch_sizes)
        systems = {f"crosswhisper batch {b}": ours(bundle, b) for b in args.batch_sizes}
        systems[f"crosswhisper batch {top} drafting (gamma=3)"] = ours(bundle, top, gamma=3)
        systems.update({f"transformers generate batch {b}": transformers_batched(bundle, b) for b in sorted({1, 8})})
        exact = {name: "crosswhisper batch 1" for name in systems if name.startswith("crosswhisper")}
        exact.pop("crosswhisper batch 1", None)
        part = measure(systems, audios, references, args.rounds, exact)
        report["utterances"] = {"count": len(audios), "audio_seconds": sum(len(a) for a in audios) / SAMPLE_RATE,
                                "systems": part}
        print(table(f"{len(audios)} utterances, {report['utterances']['audio_seconds']:.0f} s", part, "crosswhisper batch 1"))

    if args.long_minutes:
        files = joined_chapters(args.data, set(args.speakers), args.long_minutes * 60)
        audios = [audio for _, audio, _ in files]
        references = [text for _, _, text in files]
        b = args.long_batch_size
        systems = {"crosswhisper batch 1": ours(bundle, 1), f"crosswhisper batch {b}": ours(bundle, b),
                   f"crosswhisper batch {b} drafting (gamma=3)": ours(bundle, b, gamma=3)}
        threads = torch.get_num_threads()
        systems.update({f"faster-whisper batched {ct} batch {b}": faster_whisper_batched(args.model, ct, b, threads, args.device)
                        for ct in args.compute_types})
        systems["crosswhisper sequential transcribe()"] = sequential(bundle)
        exact = {name: "crosswhisper batch 1" for name in systems if name.startswith(f"crosswhisper batch {b}")}
        for ct in args.our_compute_types:  # each checked against our batch 1 at that compute type
            systems[f"crosswhisper batch 1 {ct}"] = ours(bundle, 1, compute_type=ct)
            systems[f"crosswhisper batch {b} {ct}"] = ours(bundle, b, compute_type=ct)
            exact[f"crosswhisper batch {b} {ct}"] = f"crosswhisper batch 1 {ct}"
        part = measure(systems, audios, references, args.rounds, exact)
        minutes = sum(len(a) for a in audios) / SAMPLE_RATE / 60
        report["long_files"] = {"files": [name for name, _, _ in files], "audio_minutes": minutes, "systems": part}
        print(table(f"{len(files)} long files, {minutes:.1f} min", part, "crosswhisper batch 1"))

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

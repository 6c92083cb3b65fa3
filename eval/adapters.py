"""Two adapters of one model side by side on the held-out long files (an adapter stage's card):
lossless tokens per forward of each, end to end (`transcribe(temperature=0.0)`), and whether
both give the same tokens (they must: lossless decoding is greedy's whatever the adapter).

    python eval/adapters.py --model tiny.en --candidate STAGE10 --gammas 3 4

The files are `longform.py`'s (each held-out chapter joined in order with 0.5 s pauses); the
baseline (default: the shipped adapter) runs at the CPU default γ (3), the candidate at every
--gammas, interleaved file by file in one process after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import DEFAULT_DATA, EvalError, machine_info
from longform import joined_chapters

import crosswhisper
from crosswhisper.audio import SAMPLE_RATE
from crosswhisper.lora import shipped_adapter_for
from crosswhisper.whisper import get_bundle
from crosswhisper.whisper.transcribe import DEFAULT_GAMMA


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--candidate", type=Path, required=True, help="the new adapter's directory")
    parser.add_argument("--baseline", type=Path, help="default: the adapter shipped for --model")
    parser.add_argument("--gammas", nargs="+", type=int, default=[3], help="the candidate's draft sizes")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA.parent / "train-clean-5")
    parser.add_argument("--speakers", nargs="*", default=["1088", "3526"], help="held out by the shipped adapters")
    parser.add_argument("--max-minutes", type=float, default=60.0)
    parser.add_argument("--output", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    bundle = get_bundle(args.model)
    baseline = args.baseline or shipped_adapter_for(bundle)
    if baseline is None:
        raise EvalError(f"no adapter ships for {args.model}: pass --baseline")
    files = joined_chapters(args.data, set(args.speakers), args.max_minutes * 60)
    if not files:
        raise EvalError(f"no chapters of speakers {args.speakers} under {args.data}")
    gamma = DEFAULT_GAMMA["cpu"]  # the baseline's: what users get on a CPU
    runs = {("baseline", gamma): baseline, **{("candidate", g): args.candidate for g in args.gammas}}
    crosswhisper.transcribe(files[0][1][: 35 * SAMPLE_RATE], model=bundle, temperature=0.0)  # warm-up
    totals = {run: {"tokens": 0, "calls": 0, "seconds": 0.0} for run in runs}
    differing = []
    for name, audio, _ in files:
        tokens = {}
        for (label, g), adapter in runs.items():
            started = time.perf_counter()
            result = crosswhisper.transcribe(audio, model=bundle, adapter=adapter, gamma=g, temperature=0.0)
            total = totals[label, g]
            total["seconds"] += time.perf_counter() - started
            total["tokens"] += result.stats.generated_tokens
            total["calls"] += result.stats.forward_calls
            tokens[label, g] = list(result.tokens)
            print(f"{name} {label} γ={g}: {result.stats.tokens_per_forward:.3f} tokens per forward", flush=True)
        if any(t != tokens["baseline", gamma] for t in tokens.values()):
            differing.append(name)
    minutes = sum(len(audio) for _, audio, _ in files) / SAMPLE_RATE / 60
    print(f"\n{len(files)} files, {minutes:.1f} min; files whose tokens differ between runs: {len(differing)}")
    print("| adapter | γ | tokens / forward | decode + encode seconds |\n|---|---:|---:|---:|")
    for (label, g), total in totals.items():
        print(f"| {label} | {g} | {total['tokens'] / total['calls']:.3f} | {total['seconds']:.1f} |")
    if args.output:
        report = {"model": args.model, "baseline": str(baseline), "candidate": str(args.candidate),
                  "files": [name for name, _, _ in files], "minutes": minutes, "differing_files": differing,
                  "machine": machine_info("cpu"),
                  "runs": {f"{label} gamma={g}": {**t, "tokens_per_forward": t["tokens"] / t["calls"]}
                           for (label, g), t in totals.items()}}
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if differing else 0


if __name__ == "__main__":
    raise SystemExit(main())

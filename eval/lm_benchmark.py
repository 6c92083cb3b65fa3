"""Text-LM decoding speed on held-out prompts: Cross-Regression vs transformers `generate`.

    python eval/lm_benchmark.py                                  # bundled SmolLM2, shipped adapter
    python eval/lm_benchmark.py --gammas 2 3 4 8 --prompts 24 --max-new-tokens 128
    python eval/lm_benchmark.py --call-cost                      # one decoder call per block size

Per prompt, after a warm-up, the systems run interleaved in one process: `generate` greedy
(the reference), our own autoregressive loop (γ = 0), and lossless Cross-Regression at each
γ. Reported: tokens per forward, token mismatches against `generate` (lossless must give 0),
and wall-clock ratios against `generate` summed over all prompts (DESIGN §4: ratios from one
run are the figure, absolute times on a shared machine are not). Writes JSON with --output.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from crosswhisper.decoding import DecodeOptions
from crosswhisper.dual_stream import HFDualStream
from crosswhisper.lm import (
    DEFAULT_LM,
    decode_tokens,
    encode_prompt,
    generate_reference,
    get_lm,
)
from crosswhisper.lora import load_adapter, shipped_adapter_for


def call_cost(lm, adapted, prefix: list[int], gammas, repeats: int = 20) -> dict:
    """Median time of one call after a committed prefix: 1 row × 1 token (a plain step) vs
    2 rows × (1 + γ) tokens (both streams), as ratios to the plain step; interleaved."""
    import statistics

    causal_lm = adapted.peft_model.base_model.model

    def streams(drafting):
        s = HFDualStream(
            causal_lm.get_decoder(), causal_lm.get_output_embeddings(), None,
            process_logits=lambda logits, index, tokens: logits, gate=adapted.gate, drafting=drafting,
            max_length=lm.model.config.max_position_embeddings,
        )
        s.reset(1)
        s.forward_block(torch.tensor([prefix[:-1]]), torch.empty(1, 0, dtype=torch.long))
        s.commit(len(prefix) - 1)
        return s

    shapes = {0: streams(False), **{g: streams(True) for g in gammas}}
    times = {g: [] for g in shapes}
    last = torch.tensor([prefix[-1:]])
    for _ in range(repeats + 2):  # the first two rounds warm up
        for g, s in shapes.items():
            t0 = time.perf_counter()
            s.forward_block(last, torch.full((1, g), prefix[-1]))
            times[g].append(time.perf_counter() - t0)
            s.commit(1)
            s._cache.crop(-1)  # back to the same prefix length
            s.length -= 1
    step = statistics.median(times[0][2:])
    return {"single_step_ms": round(1000 * step, 2), **{f"2 rows x {1 + g}": round(statistics.median(times[g][2:]) / step, 3) for g in gammas}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_LM)
    parser.add_argument("--adapter", default=None, help="peft directory (default: the shipped adapter)")
    parser.add_argument("--prompts-file", type=Path, default=None, help="JSON id → messages (default: the adapter's held-out set)")
    parser.add_argument("--prompts", type=int, default=24, help="use the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--gammas", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--call-cost", action="store_true", help="only time one call per block size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    lm = get_lm(args.model, device=args.device)
    directory = Path(args.adapter) if args.adapter else shipped_adapter_for(lm)
    if directory is None:
        parser.error(f"no adapter ships for {args.model}: pass --adapter")
    adapted = load_adapter(lm, directory)
    prompts_file = args.prompts_file or directory / "held_out_prompts.json"
    prompts = list(json.loads(prompts_file.read_text()).values())[: args.prompts]
    encoded = [encode_prompt(lm, p) for p in prompts]
    if args.call_cost:
        print(json.dumps(call_cost(lm, adapted, (encoded[0] * 3)[:120], args.gammas), indent=2))
        return 0

    def reference(ids):
        return generate_reference(lm, ids, temperature=0, max_new_tokens=args.max_new_tokens), None

    def ours(gamma):
        def run(ids):
            out = decode_tokens(lm, ids, adapted=adapted, options=DecodeOptions(gamma=gamma, max_new_tokens=args.max_new_tokens))
            return out.tokens, out.forward_calls

        return run

    systems = {"generate": reference, "own loop γ=0": ours(0)}
    systems.update({f"lossless γ={g}": ours(g) for g in args.gammas})
    for run in systems.values():  # warm-up (also picks the projection kernels per row count)
        run(encoded[0][:16])

    seconds = {name: 0.0 for name in systems}
    tokens = {name: 0 for name in systems}
    calls = {name: 0 for name in systems}
    mismatches = {name: 0 for name in systems}
    for i, ids in enumerate(encoded):
        expected = None
        for name, run in systems.items():
            t0 = time.perf_counter()
            out, forward_calls = run(ids)
            seconds[name] += time.perf_counter() - t0
            expected = out if expected is None else expected
            tokens[name] += len(out)
            calls[name] += forward_calls if forward_calls is not None else len(out)
            mismatches[name] += out != expected
        print(f"prompt {i + 1}/{len(encoded)}: {len(expected)} tokens", file=sys.stderr)

    base = seconds["generate"]
    rows = [
        {
            "system": name,
            "tokens_per_forward": round(tokens[name] / calls[name], 3),
            "mismatches": mismatches[name],
            "speed_vs_generate": round(base / seconds[name], 3),
            "seconds": round(seconds[name], 2),
        }
        for name in systems
    ]
    result = {
        "model": args.model,
        "adapter": str(directory),
        "prompts": len(encoded),
        "max_new_tokens": args.max_new_tokens,
        "generated_tokens": tokens["generate"],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, device {args.device}",
        "systems": rows,
    }
    print("| system | tokens/forward | mismatches | × generate (wall) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['tokens_per_forward']:.2f} | {r['mismatches']}/{len(encoded)} | {r['speed_vs_generate']:.2f}× |")
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decoder benchmarks: cost of one dual-stream call, decode-phase speed on LibriSpeech, and
where a decode's time goes (phases).

    python eval/benchmark.py call_cost --model tiny.en
    python eval/benchmark.py decode --model tiny.en --adapter random --gammas 4 16
    python eval/benchmark.py phases --model base --adapter crosswhisper/adapters/base --gammas 0 4 8
    python eval/benchmark.py projection --model tiny.en --rows 1 2 4 8
    python eval/benchmark.py kernels --model base --files tests/data/longform/1088-134318.flac
    python eval/benchmark.py screen --model tiny.en --files tests/data/longform/1088-134318.flac --gammas 3

Everything is measured in one process, systems interleaved per repetition/utterance after a
warm-up, and reported as ratios against the baseline of the same run (DESIGN §4): absolute
times on a shared CPU are noise, ratios from one run are the figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from crosswhisper.audio import SAMPLE_RATE, load_audio
from crosswhisper.decoding import DecodeOptions
from crosswhisper.dual_stream import HFDualStream
from crosswhisper.lora import load_adapter, new_adapter, save_adapter
from crosswhisper.whisper.streams import WhisperStreams
from crosswhisper.whisper import (
    decode_window,
    decoder_prompt,
    encode,
    generate_greedy,
    get_bundle,
    logits_processor,
)

# the helpers beside this script (its folder is on sys.path when it runs as `python eval/benchmark.py`)
from common import DEFAULT_DATA, DTYPES, EvalError, find_librispeech, sync_device


def _bundle(args):
    return get_bundle(args.model, device=args.device, dtype=DTYPES[args.dtype])


def _audio_files(args) -> list[Path]:
    """The audio of a LibriSpeech tree (any format), in utterance order."""
    return [path for _, path, _ in find_librispeech(Path(args.data))]


def _clock(device: str) -> float:
    sync_device(device)
    return time.perf_counter()


def _adapter(bundle, spec: str):
    """The adapter as users get it: a peft directory through `load_adapter` (fused layers)."""
    if spec == "random":  # untrained, non-zero LoRA: the worst case for drafting
        import tempfile

        directory = tempfile.mkdtemp(prefix="crosswhisper-random-adapter-")
        save_adapter(new_adapter(bundle, rank=32, random_init=True, seed=0), directory, bundle)
        spec = directory
    return load_adapter(bundle, spec)


def call_cost(args) -> dict:
    """Median wall time of one decoder call after a committed prefix (--prefix-length tokens), per
    block shape: transformers' decoder as two rows (`HFDualStream`), our own arithmetic in one row
    (`WhisperStreams`, what `transcribe()` runs)."""
    bundle = _bundle(args)
    adapted = _adapter(bundle, args.adapter)
    whisper = adapted.peft_model.base_model.model
    audio = load_audio(_audio_files(args)[0])
    device = bundle.model.device
    hidden = encode(bundle, audio)
    prompt = decoder_prompt(bundle, "en")
    filler = bundle.tokenizer.encode(" the", add_special_tokens=False)[0]  # any ordinary token
    prefix = prompt + [filler] * (args.prefix_length - len(prompt))
    process = logits_processor(bundle, len(prompt))

    def streams(drafting: bool, plain: bool = False, one_row: bool = False):
        model = bundle.model if plain else whisper
        if one_row:
            return WhisperStreams(model.model.decoder, model.proj_out, hidden, process_logits=process,
                                  drafting=drafting, max_length=448)
        return HFDualStream(
            model.model.decoder, model.proj_out, hidden, process_logits=process,
            gate=None if plain else adapted.gate, drafting=drafting, max_length=448,
        )

    def setup(model):
        model.reset(1)
        model.forward_block(torch.tensor([prefix], device=device), torch.empty(1, 0, dtype=torch.long, device=device))
        model.commit(len(prefix))

    def block_call(model, r, g):
        # one call, logits at the last pending token and every draft (processed)
        return lambda: model.forward_block(torch.full((1, r), filler, device=device), torch.full((1, g), filler, device=device))

    plain = streams(False, plain=True)
    own_plain = streams(False, plain=True, one_row=True)
    shapes = [("single-token step, transformers' decoder (HFDualStream)", plain, block_call(plain, 1, 0)),
              ("single-token step, own arithmetic (WhisperStreams)", own_plain, block_call(own_plain, 1, 0))]
    for block in args.blocks:
        two = streams(True)
        one = streams(True, one_row=True)
        shapes.append((f"two rows × {block} (HFDualStream)", two, block_call(two, 1, block - 1)))
        shapes.append((f"one row × {2 * block} (WhisperStreams, the default)", one, block_call(one, 1, block - 1)))
    times = {label: [] for label, *_ in shapes}
    with torch.inference_mode():
        for rep in range(args.repeats + 2):  # the first two rounds warm up
            for label, model, run in shapes:  # interleaved
                setup(model)
                t0 = _clock(args.device)
                run()
                if rep >= 2:
                    times[label].append(_clock(args.device) - t0)
    base = statistics.median(times[shapes[0][0]])
    rows = [
        {"shape": label, "ms": 1000 * statistics.median(ts), "vs_single_token": statistics.median(ts) / base}
        for label, ts in times.items()
    ]
    print(f"\n{args.model}, {args.device} {args.dtype}, torch threads {torch.get_num_threads()}, median of {args.repeats}\n")
    print("| call | ms | × single-token step |\n|---|---|---|")
    for row in rows:
        print(f"| {row['shape']} | {row['ms']:.1f} | {row['vs_single_token']:.2f} |")
    return {"model": args.model, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(), "rows": rows}


def decode_speed(args) -> dict:
    """Decode phase on every utterance: generate (reference), our AR loop, cross-regression."""
    bundle = _bundle(args)
    adapted = _adapter(bundle, args.adapter)
    files = _audio_files(args)[: args.max_utterances]
    windows = []
    for path in files:
        hidden = encode(bundle, load_audio(path))
        windows.append((path.stem, hidden, decoder_prompt(bundle, "en")))

    systems = {"generate (reference)": lambda h, p: _run_generate(bundle, h, p)}
    systems["own loop, γ=0"] = lambda h, p: _run_loop(bundle, h, p, None, DecodeOptions(gamma=0))
    for gamma in args.gammas:
        systems[f"cross-regression γ={gamma}"] = (
            lambda h, p, g=gamma: _run_loop(bundle, h, p, adapted, DecodeOptions(gamma=g))
        )
        if args.blank_branches:
            systems[f"cross-regression γ={gamma}, blank branches"] = (
                lambda h, p, g=gamma: _run_loop(bundle, h, p, adapted, DecodeOptions(gamma=g, blank_branches=True))
            )
    totals = {name: {"seconds": 0.0, "tokens": 0, "calls": 0, "mismatches": 0} for name in systems}
    for name, run in systems.items():  # warm-up
        run(windows[0][1], windows[0][2])
    for utt, hidden, prompt in windows:
        reference = None
        for name, run in systems.items():  # interleaved per utterance
            t0 = _clock(args.device)
            tokens, calls = run(hidden, prompt)
            seconds = _clock(args.device) - t0
            reference = tokens if reference is None else reference
            total = totals[name]
            total["seconds"] += seconds
            total["tokens"] += len(tokens)
            total["calls"] += calls
            total["mismatches"] += tokens != reference
    ref = totals["generate (reference)"]["seconds"]
    print(f"\n{args.model}, adapter {args.adapter}, {len(windows)} utterances, {args.device} {args.dtype}, threads {torch.get_num_threads()}\n")
    print("| system | tokens/forward | decode s | × reference speed | token mismatches |\n|---|---|---|---|---|")
    for name, t in totals.items():
        t["tokens_per_forward"] = t["tokens"] / t["calls"]
        t["speedup_vs_reference"] = ref / t["seconds"]
        print(
            f"| {name} | {t['tokens_per_forward']:.3f} | {t['seconds']:.2f} | "
            f"{t['speedup_vs_reference']:.2f} | {t['mismatches']} |"
        )
    return {"model": args.model, "adapter": args.adapter, "device": args.device, "dtype": args.dtype,
            "utterances": len(windows), "systems": totals}


def phases(args) -> dict:
    """Wall time of each phase of our decoding loop (device synchronised around each phase)."""
    import collections

    import crosswhisper.decoding as decoding
    from crosswhisper.acceptance import DraftBuffer

    totals, counts = collections.Counter(), collections.Counter()

    def timed(name, function):
        def run(*a, **k):
            t0 = _clock(args.device)
            result = function(*a, **k)
            totals[name] += _clock(args.device) - t0
            counts[name] += 1
            return result

        return run

    patches = [
        (HFDualStream, "forward_block"), (HFDualStream, "commit"), (decoding, "verify_greedy"),
        (DraftBuffer, "refill"), (decoding, "_sample"),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name in patches]
    for owner, name, function in originals:
        setattr(owner, name, timed(name, function))
    try:
        bundle = _bundle(args)
        adapted = _adapter(bundle, args.adapter)
        files = _audio_files(args)[: args.max_utterances]
        windows = [(encode(bundle, load_audio(path)), decoder_prompt(bundle, "en")) for path in files]
        rows = []
        for gamma in args.gammas:
            options = DecodeOptions(gamma=gamma)
            decode_window(bundle, *windows[0], adapted=adapted, options=options)  # warm-up
            totals.clear()
            counts.clear()
            tokens, t0 = 0, _clock(args.device)
            for hidden, prompt in windows:
                tokens += len(decode_window(bundle, hidden, prompt, adapted=adapted, options=options).tokens)
            seconds = _clock(args.device) - t0
            calls = counts["forward_block"]
            row = {"gamma": gamma, "tokens": tokens, "calls": calls, "ms_per_call": 1000 * seconds / calls,
                   "phases_ms": {name: 1000 * t for name, t in totals.items()}}
            row["phases_ms"]["rest of the loop"] = 1000 * seconds - sum(row["phases_ms"].values())
            rows.append(row)
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)
    print(f"\n{args.model}, adapter {args.adapter}, {len(windows)} utterances, {args.device} {args.dtype}\n")
    names = [name for _, name in patches] + ["rest of the loop"]
    print("| γ | tokens/call | ms/call | " + " | ".join(names) + " |")
    print("|---" * (3 + len(names)) + "|")
    for row in rows:
        per_call = [f"{row['phases_ms'].get(name, 0.0) / row['calls']:.2f}" for name in names]
        print(f"| {row['gamma']} | {row['tokens'] / row['calls']:.2f} | {row['ms_per_call']:.2f} | " + " | ".join(per_call) + " |")
    print("\n(phase columns: ms per forward call)")
    return {"model": args.model, "adapter": args.adapter, "device": args.device, "dtype": args.dtype, "rows": rows}


def projection(args) -> dict:
    """The vocabulary projection's cost curve: each kernel `dual_stream.project` chooses from,
    per row count (median ms, kernels interleaved per repetition after a warm-up)."""
    import torch.nn.functional as F

    from crosswhisper import dual_stream

    bundle = _bundle(args)
    weight = bundle.weights.proj_out.weight.detach()
    packed = dual_stream._pack(weight)
    kernels = {"x@Wᵀ (F.linear)": lambda x: F.linear(x, weight), "W@xᵀ": lambda x: dual_stream._w_xt(x, weight)}
    if packed is not None:
        kernels["oneDNN blocked copy"] = lambda x: dual_stream._packed(x, packed)
    if weight.device.type == "cpu" and weight.dtype == torch.float32:  # the int8 compute type's products
        from crosswhisper import quantized

        on_fbgemm = quantized.Int8Linear(weight)
        if on_fbgemm.fbgemm is not None:
            kernels["int8 fbgemm"] = on_fbgemm
        with mock.patch.object(quantized, "use_fbgemm", lambda: False):
            kernels["int8 _int_mm"] = quantized.Int8Linear(weight)
        screened = dual_stream._make_screen(weight)  # the float32 type's screened projection
        if screened is not None:
            from crosswhisper.whisper.decode import exact_argmax

            exact = exact_argmax(bundle)
            kernels["float32 screened (fp16 + exact)"] = lambda x: screened(x, exact)
    torch.manual_seed(0)
    inputs = {rows: torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device) for rows in args.rows}
    times = {(rows, name): [] for rows in args.rows for name in kernels}
    with torch.inference_mode():
        for rep in range(args.repeats + 2):  # the first two rounds warm up
            for rows, x in inputs.items():
                for name, kernel in kernels.items():
                    t0 = _clock(args.device)
                    kernel(x)
                    if rep >= 2:
                        times[(rows, name)].append(_clock(args.device) - t0)
    table = [{"rows": rows, **{name: 1000 * statistics.median(times[(rows, name)]) for name in kernels}} for rows in args.rows]
    print(f"\n{args.model} projection {tuple(weight.shape)}, {args.device} {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"median ms of {args.repeats}\n")
    print("| rows | " + " | ".join(kernels) + " |")
    print("|---" * (1 + len(kernels)) + "|")
    for row in table:
        print(f"| {row['rows']} | " + " | ".join(f"{row[name]:.2f}" for name in kernels) + " |")
    return {"model": args.model, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(), "rows": table}


def kernels(args) -> dict:
    """End to end (`transcribe()`, lossless, temperature 0) on long files: our own loop (γ = 0)
    and the drafting loop at each γ of --gammas with its linear layers through MKL
    (`F.linear`) and through oneDNN's blocked weights (`dual_stream.small_linear`, the
    default), interleaved file by file after a warm-up; decode-phase seconds, ratios against
    our own loop, tokens per forward, whether every system gave the same tokens."""
    from crosswhisper import dual_stream

    blocked_rows = dual_stream.BLOCKED_ROWS

    def rows(count):
        return mock.patch.object(dual_stream, "BLOCKED_ROWS", count)

    systems = [("own loop (γ = 0)", 0, rows(blocked_rows))]
    for g in args.gammas:
        systems += [(f"γ = {g}, linear layers on MKL", g, rows(1)), (f"γ = {g}, blocked weights (default)", g, rows(blocked_rows))]
    return _interleaved(args, systems)


def screen(args) -> dict:
    """`kernels`' comparison for the vocabulary projection: screened through float16 where that
    was timed faster (`dual_stream._Screen`, the default) or the float32 product throughout, for
    our own loop (γ = 0) and each γ of --gammas."""
    from crosswhisper.whisper import decode

    def full():  # no ids named exact: `project` runs the float32 product
        return mock.patch.object(decode, "exact_argmax", lambda bundle: None)

    systems = [("own loop (γ = 0), float32 projection", 0, full()), ("own loop (γ = 0), screened (default)", 0, contextlib.nullcontext())]
    for g in args.gammas:
        systems += [(f"γ = {g}, float32 projection", g, full()), (f"γ = {g}, screened (default)", g, contextlib.nullcontext())]
    return _interleaved(args, systems)


def _interleaved(args, systems) -> dict:
    """`transcribe()` per system (name, γ, a context manager that sets it up), interleaved file by
    file and round by round after a warm-up; the first system is the baseline."""
    import crosswhisper

    bundle = _bundle(args)
    files = [Path(f) for f in args.files] or _audio_files(args)[:1]
    audios = [load_audio(f) for f in files]
    crosswhisper.transcribe(audios[0][: 35 * SAMPLE_RATE], model=bundle, temperature=0.0)  # warm-up
    decode = {name: 0.0 for name, *_ in systems}
    total, calls, tokens, same = dict(decode), {name: 0 for name in decode}, {name: 0 for name in decode}, True
    for _ in range(args.rounds):
        for audio in audios:
            reference = None
            for name, gamma, setting in systems:
                with setting:
                    t0 = _clock(args.device)
                    result = crosswhisper.transcribe(audio, model=bundle, gamma=gamma, temperature=0.0)
                    total[name] += _clock(args.device) - t0
                decode[name] += result.stats.decode_seconds
                calls[name] += result.stats.forward_calls
                tokens[name] += result.stats.generated_tokens
                reference = result.tokens if reference is None else reference
                same &= result.tokens == reference
    base = systems[0][0]
    rows = [{"system": name, "decode_s": decode[name], "decode_vs_own_loop": decode[base] / decode[name],
             "total_s": total[name], "total_vs_own_loop": total[base] / total[name],
             "tokens_per_forward": tokens[name] / calls[name]} for name in decode]
    print(f"\n{args.model}, {len(files)} file(s), {sum(len(a) for a in audios) / SAMPLE_RATE:.0f} s, {args.rounds} round(s), "
          f"torch threads {torch.get_num_threads()}; same tokens everywhere: {same}\n")
    print("| system | decode s | decode × first row | end to end × first row | tokens / forward |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['system']} | {row['decode_s']:.1f} | {row['decode_vs_own_loop']:.2f} | {row['total_vs_own_loop']:.2f} | "
              f"{row['tokens_per_forward']:.2f} |")
    return {"model": args.model, "files": [str(f) for f in files], "rounds": args.rounds, "same_tokens": same,
            "threads": torch.get_num_threads(), "rows": rows}


def _run_generate(bundle, hidden, prompt):
    return generate_greedy(bundle, hidden, prompt)


def _run_loop(bundle, hidden, prompt, adapted, options):
    result = decode_window(bundle, hidden, prompt, adapted=adapted, options=options)
    return result.tokens, result.forward_calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["call_cost", "decode", "phases", "projection", "kernels", "screen"])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--adapter", default="random", help="'random' (untrained) or a peft adapter directory")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a LibriSpeech subset directory")
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 3, 4, 5], help="pending + drafts per stream, γ + 1 (call_cost)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8], help="row counts (projection)")
    parser.add_argument("--prefix-length", type=int, default=250, help="committed tokens before the call (call_cost; long-form prompts are ~250)")
    parser.add_argument("--gammas", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--blank-branches", action="store_true", help="decode: each γ with blank branches too")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max-utterances", type=int, default=None)
    parser.add_argument("--files", nargs="*", default=[], help="audio files (kernels, screen; default: the first of --data)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the files (kernels, screen)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        result = {"call_cost": call_cost, "decode": decode_speed, "phases": phases, "projection": projection, "kernels": kernels,
                  "screen": screen}[args.what](args)
    except EvalError as error:  # missing data: one line, not a traceback
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command lines.

    crosswhisper-transcribe FILE|FOLDER... [--manifest LIST] [--model NAME] [--output-format ...] [--output-dir DIR]
    crosswhisper-transcribe FILE|FOLDER... --batch-size N (batched: VAD chunks, N windows per call)
    crosswhisper-transcribe FOLDER... --ray [ADDRESS]     (bulk: Ray Data, resumable; crosswhisper.bulk)
    crosswhisper-generate "PROMPT" [--model NAME] [--raw] [--max-new-tokens N] [--stats]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from .audio import SAMPLE_RATE, load_audio
from .bulk import collect_jobs, transcribe_files
from .decoding import DecodeOptions
from .engine import default_gamma
from .lora import resolve_adapter
from .whisper.transcribe import TranscribeOptions, get_bundle, option_fields, transcribe
from .writers import OUTPUT_FORMATS, format_timestamp, get_writer

logger = logging.getLogger("crosswhisper")

PROGRESS_FORMAT = "{desc}: {percentage:3.0f}% | {n:.0f}/{total:.0f} s of audio [{elapsed}<{remaining}]"


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `TranscribeOptions` field: --gamma, --beta, --condition-on-previous-text, ..."""
    for option in option_fields():
        flag = "--" + option.name.replace("_", "-")
        help_text = option.metadata["help"]
        if option.name == "temperature":  # openai-whisper's pair of flags make the sequence
            parser.add_argument(flag, type=float, default=0.0, help=help_text)
            parser.add_argument(
                "--temperature-increment-on-fallback", type=float, default=0.2,
                help="temperature step of the fallback up to 1.0; 0 = no fallback (default: 0.2)",
            )
        elif str(option.type) in ("bool", "<class 'bool'>"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=option.default, help=help_text)
        else:
            kind = {"Optional[int]": int, "int": int, "float": float, "Optional[float]": float}.get(str(option.type), str)
            parser.add_argument(
                flag, type=kind, default=option.default, help=help_text, choices=option.metadata.get("choices")
            )


def _options_from(args: argparse.Namespace) -> TranscribeOptions:
    values = {option.name: getattr(args, option.name) for option in option_fields()}
    start, step = args.temperature, args.temperature_increment_on_fallback
    values["temperature"] = (start,) if not step else tuple(np.arange(start, 1.0 + 1e-6, step).round(4))
    return TranscribeOptions(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crosswhisper-transcribe",
        description="Transcribe audio files with Whisper, decoded by Cross-Regression.",
    )
    parser.add_argument(
        "files", nargs="*", metavar="FILE",
        help="audio or video files (wav, flac, mp3, m4a, ogg/opus, mp4, webm, ...) or folders (searched recursively; "
        "their structure is kept under --output-dir)",
    )
    parser.add_argument("--manifest", type=Path, default=None, help="a text file listing inputs, one path per line (relative to its folder)")
    parser.add_argument(
        "--model",
        default="tiny.en",
        help="bundled name (tiny.en, base), Hugging Face id or directory, or faster-whisper directory "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--adapter",
        default="auto",
        help="peft adapter directory of the predictive stream (default: the adapter shipped for the model; "
        "none ships → no drafting)",
    )
    parser.add_argument("--no-adapter", action="store_true", help="plain greedy decoding (transformers generate)")
    _add_option_flags(parser)
    parser.add_argument(
        "--output-format",
        "-f",
        choices=[*OUTPUT_FORMATS, "all"],
        default="txt",
        help="format of the written transcripts (default: %(default)s)",
    )
    parser.add_argument("--output-dir", "-o", type=Path, default=Path("."), help="where to write (default: .)")
    parser.add_argument("--device", default=None, help="torch device (default: cpu; with --ray: cuda when the cluster has GPUs)")
    parser.add_argument(
        "--batch-size", type=int, default=None, metavar="N",
        help="batched pipeline: speech found by voice activity detection, cut at pauses into ≤ 30 s chunks, "
        "N chunks (of one or several files) decoded at a time, each independently (no previous-text prompt). "
        "Default: the sequential algorithm, one window at a time",
    )
    bulk = parser.add_argument_group(
        "bulk transcription on Ray Data (pip install \"crosswhisper[ray]\")",
        "files whose outputs exist are skipped (a rerun does the rest); failures go to <output-dir>/failures.jsonl",
    )
    bulk.add_argument(
        "--ray", nargs="?", const="", default=None, metavar="ADDRESS",
        help="run on a Ray cluster: ADDRESS (e.g. auto, ray://head:10001), or none for $RAY_ADDRESS or a local cluster",
    )
    bulk.add_argument("--retry-failed", action="store_true", help="--ray: try again the files listed in failures.jsonl")
    bulk.add_argument("--workers", type=int, default=None, help="--ray: transcriber actors (default: one per GPU, else CPUs / threads)")
    bulk.add_argument("--threads", type=int, default=None, help="--ray: torch threads per CPU actor (default: min(4, CPUs))")
    parser.add_argument("--verbose", "-v", action="store_true", help="print segments as they are decoded; log debugging details and library warnings")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_output(verbose=args.verbose)
    adapter = None if args.no_adapter else args.adapter
    try:  # refuse bad values before loading anything
        options = _options_from(args)
        options.decode_options(args.device or "cpu")
        if not args.files and args.manifest is None:
            raise ValueError("give files, folders or --manifest")
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError("--batch-size must be ≥ 1")
        if args.batch_size is not None and args.ray is not None:
            raise ValueError("--batch-size and --ray do not go together yet")
        for name in ("workers", "threads"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name} must be ≥ 1")
        # --ray: transcribe_files collects (and checks) the inputs itself, before starting Ray
        jobs = collect_jobs(args.files, manifest=args.manifest) if args.ray is None else None
    except (ValueError, RuntimeError) as error:  # RuntimeError: torch does not know --device
        parser.error(str(error))
    if args.ray is not None:
        return _bulk_main(args, adapter, options)
    device = args.device or "cpu"

    # a model or adapter that cannot load would fail every file: stop here, clearly
    try:
        bundle = get_bundle(args.model, device=device)
    except Exception as error:
        logger.error("cannot load model %r: %s", args.model, error)
        return 2
    if adapter is not None:
        try:
            resolved = resolve_adapter(bundle, adapter)
            # "auto" with no adapter shipped for this model stays "auto": no drafting, own loop
            adapter = resolved if resolved is not None else adapter
        except (OSError, ValueError) as error:
            logger.error("cannot use adapter %r: %s", adapter, error)
            return 2

    if args.batch_size is not None:
        return _batched_main(args, jobs, bundle, adapter, options, device)
    failures = 0
    for job in tqdm(jobs, desc="transcribing", unit="file", disable=len(jobs) < 2 or args.quiet):
        path = job.audio
        try:
            waveform = load_audio(path)
            seconds = len(waveform) / SAMPLE_RATE
            # a bar in audio seconds for files longer than one window (our own progress, on stderr)
            with tqdm(total=round(seconds, 1), unit="s", desc=path.name, leave=False,
                      disable=args.quiet or seconds <= 30, bar_format=PROGRESS_FORMAT) as bar:
                result = transcribe(
                    waveform, model=bundle, adapter=adapter, device=device, options=options,
                    progress=lambda done, bar=bar: bar.update(round(done - bar.n, 1)),
                    on_segment=_print_segment if args.verbose else None,
                )
            get_writer(args.output_format, args.output_dir / job.subdir)(result, path)
        except (OSError, ValueError) as error:
            # one bad file must not cost the others their transcripts: report it and go on
            failures += 1
            tqdm.write(f"error: {path}: {error}", file=sys.stderr)
            continue
        tqdm.write(f"{path}: {result.text}")
    if failures:
        logger.error("%d of %d file(s) failed", failures, len(jobs))
        return 1
    return 0


# --batch-size: files are read and decoded this many batches' worth at a time (a few long files
# fill batches by themselves; many short ones share them), so memory stays bounded
FILES_PER_BATCH = 4


def _batched_main(args: argparse.Namespace, jobs, bundle, adapter, options: TranscribeOptions, device) -> int:
    """--batch-size: the batched pipeline (`transcribe_batch`) over groups of files, each file
    written as soon as its group is done; a file that cannot be read fails alone."""
    from .whisper.batched import transcribe_batch

    failures = 0
    group_size = FILES_PER_BATCH * args.batch_size
    with tqdm(total=len(jobs), desc="transcribing", unit="file", disable=len(jobs) < 2 or args.quiet) as files_bar:
        for first in range(0, len(jobs), group_size):
            group, waveforms = [], []
            for job in jobs[first : first + group_size]:
                try:
                    waveforms.append(load_audio(job.audio))
                    group.append(job)
                except (OSError, ValueError) as error:
                    failures += 1
                    tqdm.write(f"error: {job.audio}: {error}", file=sys.stderr)
                    files_bar.update(1)
            if not group:
                continue
            seconds = sum(len(w) for w in waveforms) / SAMPLE_RATE
            with tqdm(total=round(seconds, 1), unit="s", desc=f"{len(group)} file(s)", leave=False,
                      disable=args.quiet or seconds <= 30, bar_format=PROGRESS_FORMAT) as bar:
                results = transcribe_batch(
                    waveforms, model=bundle, adapter=adapter, device=device, batch_size=args.batch_size,
                    options=options, progress=lambda done: bar.update(round(done - bar.n, 1)),
                )
            for job, result in zip(group, results):
                get_writer(args.output_format, args.output_dir / job.subdir)(result, job.audio)
                if args.verbose:
                    for segment in result.segments:
                        _print_segment(segment)
                tqdm.write(f"{job.audio}: {result.text}")
                files_bar.update(1)
    if failures:
        logger.error("%d of %d file(s) failed", failures, len(jobs))
        return 1
    return 0


def _bulk_main(args: argparse.Namespace, adapter, options: TranscribeOptions) -> int:
    """--ray: the files on Ray Data (`bulk.transcribe_files`). Exit status 0 when every file has its
    transcripts, 1 when some failed (in this run or an earlier one), 2 when nothing could run."""
    try:
        report = transcribe_files(
            args.files, manifest=args.manifest, output_dir=args.output_dir, output_format=args.output_format,
            model=args.model, adapter=adapter, options=options, address=args.ray or None, workers=args.workers,
            threads=args.threads, device=args.device, retry_failed=args.retry_failed, progress=not args.quiet,
            verbose=args.verbose,
        )
    except Exception as error:  # no cluster, a model that does not load, ...: nothing could run
        logger.error("bulk transcription stopped: %s", error)
        return 2
    earlier = f", {report.failed_before} failed before (skipped; --retry-failed tries them)" if report.failed_before else ""
    print(
        f"{len(report.written)} transcribed, {report.skipped} already done, {len(report.failed)} failed{earlier}"
        + (f"; failures: {report.failures_file}" if report.failures_file else ""),
        file=sys.stderr,
    )
    return 1 if report.failed or report.failed_before else 0


def _print_segment(segment) -> None:
    """--verbose: every segment as it is decoded, as openai-whisper prints them."""
    tqdm.write(f"[{format_timestamp(segment.start)} --> {format_timestamp(segment.end)}] {segment.text}")


def configure_output(*, verbose: bool) -> None:
    """Our log lines on stderr; third-party warnings and progress bars only with --verbose."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr
    )
    if verbose:
        return
    import warnings

    warnings.filterwarnings("ignore")  # FutureWarnings &c. of the libraries we call
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" on every model load
    else:  # the same, read when it is imported (a plain transcription never imports it: ~1 s)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def build_generate_parser() -> argparse.ArgumentParser:
    from .lm import DEFAULT_LM

    parser = argparse.ArgumentParser(
        prog="crosswhisper-generate",
        description="Generate text with a causal LM, decoded by Cross-Regression (lossless by default).",
    )
    parser.add_argument("prompt", help="the prompt; '-' reads it from standard input")
    parser.add_argument(
        "--model", default=DEFAULT_LM,
        help="bundled name, GGUF file, transformers directory or Hugging Face id (default: %(default)s)",
    )
    parser.add_argument("--raw", action="store_true", help="continue the prompt as raw text (no chat template)")
    parser.add_argument("--system", default=None, help="a system message before the prompt (chat models)")
    parser.add_argument("--adapter", default="auto", help="peft adapter directory (default: the shipped one)")
    parser.add_argument("--no-adapter", action="store_true", help="plain transformers generate (the reference)")
    parser.add_argument("--gamma", type=int, default=None, help="draft slots per forward call (default: 3 on a CPU)")
    parser.add_argument("--beta", type=float, default=0.0, help="EMA factor in [0, 1); 0 = lossless (default)")
    parser.add_argument("--tau", type=float, default=0.0, help="energy floor ≤ 0; 0 = lossless (default)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    parser.add_argument("--stats", action="store_true", help="print tokens per forward and timings to stderr")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    return parser


def generate_main(argv: Optional[Sequence[str]] = None) -> int:
    from . import lm

    parser = build_generate_parser()
    args = parser.parse_args(argv)
    configure_output(verbose=False)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:  # refuse bad values before loading anything
        gamma = args.gamma if args.gamma is not None else default_gamma(lm.DEFAULT_GAMMA, args.device)
        DecodeOptions(gamma=gamma, beta=args.beta, tau=args.tau, temperature=args.temperature,
                      max_new_tokens=args.max_new_tokens)
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))
    try:
        model = lm.get_lm(args.model, device=args.device)
    except Exception as error:
        logger.error("cannot load model %r: %s", args.model, error)
        return 2
    chat = not args.raw and bool(getattr(model.tokenizer, "chat_template", None))
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": text}]
    try:
        result = lm.generate(
            messages if chat else text, model=model, adapter=None if args.no_adapter else args.adapter,
            gamma=gamma, beta=args.beta, tau=args.tau, temperature=args.temperature,
            max_new_tokens=args.max_new_tokens, seed=args.seed, device=args.device,
        )
    except (OSError, ValueError) as error:
        logger.error("%s", error)
        return 2
    print(result.text)
    if args.stats:
        s = result.stats
        print(
            f"{s.generated_tokens} tokens in {s.forward_calls} forward calls ({s.tokens_per_forward:.2f} per call), "
            f"{s.decode_seconds:.2f} s, finish: {result.finish_reason}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

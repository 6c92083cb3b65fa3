"""Command lines.

    crosswhisper-transcribe FILE... [--model NAME] [--output-format ...] [--output-dir DIR]
    crosswhisper-generate "PROMPT" [--model NAME] [--raw] [--max-new-tokens N] [--stats]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from tqdm import tqdm

from .decoding import DecodeOptions
from .whisper import Transcription, default_gamma, get_bundle, resolve_adapter, transcribe

logger = logging.getLogger("crosswhisper")

OUTPUT_FORMATS = ("txt", "srt", "vtt", "json")


def _timestamp(seconds: float, decimal: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def _write_txt(result: Transcription, out) -> None:
    out.write(result.text + "\n")


def _write_srt(result: Transcription, out) -> None:
    for index, segment in enumerate(result.segments, start=1):
        out.write(f"{index}\n{_timestamp(segment.start, ',')} --> {_timestamp(segment.end, ',')}\n{segment.text}\n\n")


def _write_vtt(result: Transcription, out) -> None:
    out.write("WEBVTT\n\n")
    for segment in result.segments:
        out.write(f"{_timestamp(segment.start, '.')} --> {_timestamp(segment.end, '.')}\n{segment.text}\n\n")


def _write_json(result: Transcription, out) -> None:
    json.dump(dataclasses.asdict(result), out, ensure_ascii=False, indent=2)
    out.write("\n")


WRITERS: dict[str, Callable[[Transcription, object], None]] = {
    "txt": _write_txt,
    "srt": _write_srt,
    "vtt": _write_vtt,
    "json": _write_json,
}


def write_result(result: Transcription, audio_path: Path, output_dir: Path, formats: Sequence[str]) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        target = output_dir / f"{audio_path.stem}.{fmt}"
        # write to a temporary name first so an interrupted run never leaves half a file
        partial = target.with_suffix(target.suffix + ".partial")
        with open(partial, "w", encoding="utf-8") as out:
            WRITERS[fmt](result, out)
        partial.replace(target)
        written.append(target)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crosswhisper-transcribe",
        description="Transcribe audio files with Whisper, decoded by Cross-Regression.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav, flac, ogg/opus, mp3, ...)")
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
    parser.add_argument(
        "--gamma", type=int, default=None, help="draft slots per forward call (default: 3 on a CPU, 4 on a GPU)"
    )
    parser.add_argument("--beta", type=float, default=0.0, help="EMA factor in [0, 1); 0 = lossless (default)")
    parser.add_argument("--tau", type=float, default=0.0, help="energy floor ≤ 0; 0 = lossless (default)")
    parser.add_argument(
        "--blank-branches", action="store_true",
        help="draft from blank branches: more tokens per call for (γ+1)² more tokens in it (worth it on a GPU)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    parser.add_argument("--language", default=None, help="language code (default: detect; 'en' for .en models)")
    parser.add_argument(
        "--output-format",
        "-f",
        choices=[*OUTPUT_FORMATS, "all"],
        default="txt",
        help="format of the written transcripts (default: %(default)s)",
    )
    parser.add_argument("--output-dir", "-o", type=Path, default=Path("."), help="where to write (default: .)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log debugging details")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr
    )
    formats = OUTPUT_FORMATS if args.output_format == "all" else (args.output_format,)
    adapter = None if args.no_adapter else args.adapter
    try:  # refuse bad values before loading anything
        gamma = args.gamma if args.gamma is not None else default_gamma(args.device)
        DecodeOptions(gamma=gamma, beta=args.beta, tau=args.tau, temperature=args.temperature)
    except (ValueError, RuntimeError) as error:  # RuntimeError: torch does not know --device
        parser.error(str(error))
    decoding = dict(
        gamma=gamma, beta=args.beta, tau=args.tau, temperature=args.temperature, seed=args.seed,
        blank_branches=args.blank_branches,
    )

    # a model or adapter that cannot load would fail every file: stop here, clearly
    try:
        bundle = get_bundle(args.model, device=args.device)
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

    failures = 0
    for name in tqdm(args.files, desc="transcribing", unit="file", disable=len(args.files) < 2):
        path = Path(name)
        try:
            result = transcribe(
                path, model=bundle, adapter=adapter, language=args.language, device=args.device, **decoding
            )
            write_result(result, path, args.output_dir, formats)
        except (OSError, ValueError) as error:
            # one bad file must not cost the others their transcripts: report it and go on
            failures += 1
            tqdm.write(f"error: {path}: {error}", file=sys.stderr)
            continue
        tqdm.write(f"{path}: {result.text}")
    if failures:
        logger.error("%d of %d file(s) failed", failures, len(args.files))
        return 1
    return 0


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
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:  # refuse bad values before loading anything
        gamma = args.gamma if args.gamma is not None else lm.default_gamma(args.device)
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

"""Train and export the predictive-stream adapter of a Whisper model (Algorithm 3).

    python recipes/train_whisper_adapter.py --model tiny.en
    python recipes/train_whisper_adapter.py --model base
    python recipes/train_whisper_adapter.py --model tiny.en --long-form --init-adapter crosswhisper/adapters/tiny.en

Data: ../shared/data/LibriSpeech/train-clean-5 (audio only: the targets are the base model's
own greedy transcripts). Speakers in --dev-speakers are held out as the development split.
With --long-form the examples are the windows Whisper's sequential long-form loop decodes
(timestamp tokens, previous-text prompts) over chapters joined into long files: each chapter's
utterances in order with 0.5 s of silence between them, capped at --chapter-seconds.
Encoder outputs and transcripts are cached in --work-dir; training checkpoints there too and
resumes after an interruption. The adapter (peft format) and its card go to --output.

Data-parallel on several processes, unchanged (crosswhisper/training/distributed.py):

    accelerate launch --multi_gpu --num_processes 4 recipes/train_whisper_adapter.py --model tiny.en

(--multi_gpu is what makes accelerate start the processes, with or without GPUs.) Each process
trains on its own draws and the gradients are averaged: one optimizer step sees processes ×
--utterances-per-step utterances. The main process prepares the examples first (the others
then read its cache), writes the checkpoints, evaluates and exports; a resume needs the same
number of processes. The model is trained on the CPU (gloo), as in one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from crosswhisper.training import (
    Processes, TrainingConfig, WhisperTask, add_draft_arguments, config_from_arguments, prepare_examples, train,
)
from crosswhisper.training.data import prepare_long_form_examples
from crosswhisper.whisper import LORA, get_bundle
from crosswhisper.whisper.cache import cache_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "LibriSpeech"
DEV_SPEAKERS = ("1088", "3526")  # held out: 81 + 55 utterances


def audio_files(subset: Path, speakers=None, exclude=()) -> list[Path]:
    files = sorted(p for p in subset.rglob("*") if p.suffix in (".flac", ".opus", ".ogg", ".wav"))
    return [p for p in files if (speakers is None or p.parts[-3] in speakers) and p.parts[-3] not in exclude]


GAP_SECONDS = 0.5  # silence between joined utterances (as tests/data/longform/make_longform.py)


def join_chapter(chapter: Path, max_seconds: float, out_dir: Path) -> tuple[Path, float]:
    """A chapter's utterances in order, 0.5 s of silence between them, until the next one would
    pass max_seconds: written once as 16 kHz FLAC in out_dir; (path, seconds)."""
    import numpy as np
    import soundfile as sf

    from crosswhisper.audio import SAMPLE_RATE, load_audio

    out = out_dir / f"{chapter.parent.name}-{chapter.name}-{int(max_seconds)}s.flac"
    if out.exists():
        return out, sf.info(out).duration
    gap = np.zeros(int(GAP_SECONDS * SAMPLE_RATE), dtype=np.float32)
    pieces, length = [], 0
    for path in audio_files(chapter.parent.parent, speakers={chapter.parent.name}):
        if path.parent != chapter:
            continue
        audio = load_audio(path)
        extra = len(audio) + (len(gap) if pieces else 0)
        if pieces and (length + extra) / SAMPLE_RATE > max_seconds:
            break
        pieces += [gap, audio] if pieces else [audio]
        length += extra
    out_dir.mkdir(parents=True, exist_ok=True)
    sf.write(out, np.concatenate(pieces), SAMPLE_RATE, subtype="PCM_16")
    return out, length / SAMPLE_RATE


def start_later(path: Path, offset: float) -> tuple[Path, float]:
    """The joined file without its first `offset` seconds, written once beside it: Whisper's
    long-form loop cuts it into other windows (other seeks, prompts and timestamps): more
    long-form training windows from the same speech. (path, seconds)."""
    import soundfile as sf

    out = path.with_name(f"{path.stem}-from{offset:g}s.flac")
    if not out.exists():
        audio, rate = sf.read(path, dtype="float32")
        sf.write(out, audio[int(offset * rate):], rate, subtype="PCM_16")
    return out, sf.info(out).duration


def joined_chapters(
    subset: Path, speakers, exclude, max_seconds: float, total_minutes, out_dir: Path, rng, start_offsets=(0.0,)
) -> tuple[list[Path], float]:
    """Chapters (shuffled by rng) joined into long files until total_minutes (None: all), each
    once per start offset (seconds cut from its start; 0: the whole joined file)."""
    chapters = sorted(
        c for c in subset.glob("*/*") if c.is_dir() and (speakers is None or c.parent.name in speakers) and c.parent.name not in exclude
    )
    rng.shuffle(chapters)
    files, seconds, chapters_seconds = [], 0.0, 0.0
    for chapter in chapters:
        if total_minutes is not None and chapters_seconds >= 60 * total_minutes:  # each chapter counted once
            break
        path, length = join_chapter(chapter, max_seconds, out_dir)
        chapters_seconds += length
        for offset in start_offsets:
            start, start_length = (path, length) if offset == 0 else start_later(path, offset)
            files.append(start)
            seconds += start_length
    return sorted(files), seconds


def human_transcripts(subset: Path) -> dict[str, str]:
    """utterance id → reference text, from the LibriSpeech `.trans.txt` files (for WER only)."""
    references = {}
    for trans in subset.rglob("*.trans.txt"):
        for line in trans.read_text().splitlines():
            utterance, _, text = line.partition(" ")
            references[utterance] = text
    return references


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--train-data", type=Path, default=SHARED / "train-clean-5")
    parser.add_argument("--test-data", type=Path, default=SHARED / "test-clean")
    parser.add_argument("--dev-speakers", nargs="+", default=list(DEV_SPEAKERS))
    parser.add_argument("--train-utterances", type=int, default=400)
    parser.add_argument("--dev-utterances", type=int, default=40)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--gamma", type=int, default=16)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--cuts-per-utterance", type=int, default=TrainingConfig.cuts_per_utterance)
    parser.add_argument("--utterances-per-step", type=int, default=TrainingConfig.utterances_per_step)
    parser.add_argument("--lr", type=float, default=TrainingConfig.lr)
    parser.add_argument(
        "--replay-truth", type=float, default=TrainingConfig.replay_truth, help="true tokens in the initial replay buffer"
    )
    add_draft_arguments(parser)
    parser.add_argument("--long-form", action="store_true", help="train and evaluate on long-form windows of joined chapters")
    parser.add_argument("--chapter-seconds", type=float, default=300.0, help="--long-form: cap of a joined training chapter")
    parser.add_argument("--dev-chapter-seconds", type=float, default=200.0, help="--long-form: cap of a joined dev chapter")
    parser.add_argument("--train-minutes", type=float, default=50.0, help="--long-form: joined training audio")
    parser.add_argument(
        "--start-offsets", type=float, nargs="+", default=[0.0],
        help="--long-form: each joined training chapter once per offset, that many seconds cut from its start "
        "(other window cuts of the same speech); --train-minutes counts the chapters once",
    )
    parser.add_argument("--init-adapter", type=Path, default=None, help="warm start from this adapter (same modules; its rank ≤ --rank)")
    parser.add_argument("--eval-gammas", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint-every", type=int, default=TrainingConfig.checkpoint_every, help="steps between checkpoints (resume points)"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="caches and checkpoints")
    parser.add_argument("--output", type=Path, default=None, help="default: crosswhisper/adapters/<model>")
    args = parser.parse_args(argv)
    if min(args.start_offsets) < 0 or len(set(args.start_offsets)) < len(args.start_offsets):
        parser.error(f"--start-offsets must be distinct and ≥ 0 seconds, not {args.start_offsets}")
    processes = Processes.from_environment()  # one, or those of `accelerate launch`
    logging.basicConfig(level=logging.INFO if processes.is_main else logging.WARNING, format="%(levelname)s: %(message)s")

    # the main process converts the model and computes the examples' caches, the others then read them
    with processes.main_process_first():
        bundle, train_examples, dev_examples, test_examples, data, prep_seconds = prepare(args)
    task = WhisperTask(bundle)
    work = args.work_dir or cache_dir() / "training" / args.model
    output = args.output or ROOT / "crosswhisper" / "adapters" / args.model

    config = config_from_arguments(args)
    t0 = time.perf_counter()
    adapted = train(task, train_examples, config, output_dir=work / config.run_name(), processes=processes)
    train_seconds = time.perf_counter() - t0
    if not processes.main_only():  # every process holds the same adapter: the main one evaluates and exports it
        return 0

    results = {}
    splits = (("dev", dev_examples, args.train_data), ("test-clean", test_examples, args.test_data))
    for split, examples, subset in splits:
        # long-form windows have no per-window human transcript: no WER there
        references = None if args.long_form and split == "dev" else human_transcripts(subset)
        results[split] = [task.evaluate(adapted, examples, g, references) for g in args.eval_gammas]
        for r in results[split]:
            wer = f", WER {100 * r['wer']:.2f} %" if "wer" in r else ""
            logging.info(
                "%s γ=%d: %.3f tokens/forward, %d mismatches%s", split, r["gamma"], r["tokens_per_forward"], r["mismatches"], wer
            )
    threads = f"{torch.get_num_threads()} torch threads"
    card = {
        "base_model": args.model,
        "base_weights_sha256": bundle.weights_sha256,
        "lora": {"rank": args.rank, "alpha": args.rank, "target_modules": LORA.target_modules},
        # processes: data-parallel (accelerate launch), an optimizer step saw processes × utterances_per_step utterances
        "training": {**asdict(config), "processes": processes.count},
        "data": data,
        "wall_seconds": {"prepare": round(prep_seconds), "train": round(train_seconds)},
        "machine": f"{platform.machine()}, "
        + (f"{processes.count} processes × {threads}" if processes.count > 1 else threads)
        + f", {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
        "tokens_per_forward": results,
    }
    task.export(adapted, output, card)
    print(json.dumps(results, indent=2))
    processes.close()
    return 0


def prepare(args):
    """The base model and the examples, cached in --work-dir: (bundle, train, dev, test, the
    card's data entry, seconds)."""
    bundle = get_bundle(args.model)
    work = args.work_dir or cache_dir() / "training" / args.model
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    if args.long_form:
        joined = work / "longform"
        train_files, train_seconds_audio = joined_chapters(
            args.train_data, None, set(args.dev_speakers), args.chapter_seconds, args.train_minutes, joined, rng, args.start_offsets
        )
        dev_files, dev_seconds_audio = joined_chapters(
            args.train_data, set(args.dev_speakers), (), args.dev_chapter_seconds, None, joined, rng
        )
        stem = f"{len(train_files)}x{int(args.chapter_seconds)}s-{int(args.train_minutes)}min"
        if args.start_offsets != [0.0]:
            stem += "-from" + "-".join(f"{o:g}" for o in args.start_offsets)
        train_examples = prepare_long_form_examples(bundle, train_files, cache_file=work / f"train-longform-{stem}.pt")
        dev_examples = prepare_long_form_examples(
            bundle, dev_files, cache_file=work / f"dev-longform-{len(dev_files)}x{int(args.dev_chapter_seconds)}s.pt"
        )
        logging.info(
            "long-form: train %d files, %.1f min, %d windows; dev %d files, %.1f min, %d windows",
            len(train_files), train_seconds_audio / 60, len(train_examples), len(dev_files), dev_seconds_audio / 60, len(dev_examples),
        )
    else:
        train_files = audio_files(args.train_data, exclude=set(args.dev_speakers))
        rng.shuffle(train_files)
        train_files = sorted(train_files[: args.train_utterances])
        dev_files = audio_files(args.train_data, speakers=set(args.dev_speakers))
        rng.shuffle(dev_files)
        dev_files = sorted(dev_files[: args.dev_utterances])
        train_examples = prepare_examples(bundle, train_files, cache_file=work / f"train-{len(train_files)}.pt")
        dev_examples = prepare_examples(bundle, dev_files, cache_file=work / f"dev-{len(dev_files)}.pt")
    test_files = audio_files(args.test_data)
    test_examples = prepare_examples(bundle, test_files, cache_file=work / "test-clean.pt")
    if args.long_form:
        data = {
            "train": f"{args.train_data.name}: {len(train_files) // len(args.start_offsets)} chapters joined (≤ {args.chapter_seconds:.0f} s each), "
            + (f"each from {', '.join(f'{o:g}' for o in args.start_offsets)} s in, " if args.start_offsets != [0.0] else "")
            + f"{train_seconds_audio / 60:.1f} min, {len(train_examples)} long-form windows, speakers except {args.dev_speakers}",
            "dev": f"{args.train_data.name}: {len(dev_files)} chapters of speakers {args.dev_speakers} joined "
            f"(≤ {args.dev_chapter_seconds:.0f} s each), {dev_seconds_audio / 60:.1f} min, {len(dev_examples)} long-form windows",
            "targets": "the windows Whisper's sequential long-form loop decodes (timestamps, previous-text prompts), "
            "the base model's own greedy tokens (no human transcripts)",
        }
    else:
        data = {
            "train": f"{args.train_data.name}: {len(train_files)} utterances, speakers except {args.dev_speakers}",
            "dev": f"{args.train_data.name}: {len(dev_files)} utterances of speakers {args.dev_speakers}",
            "targets": "the base model's own greedy transcripts (no human transcripts)",
        }
    return bundle, train_examples, dev_examples, test_examples, data, time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())

"""Train and export the predictive-stream adapter of a Whisper model (Algorithm 3).

    python recipes/train_whisper_adapter.py --model tiny.en
    python recipes/train_whisper_adapter.py --model base

Data: ../shared/data/LibriSpeech/train-clean-5 (audio only: the targets are the base model's
own greedy transcripts). Speakers in --dev-speakers are held out as the development split.
Encoder outputs and transcripts are cached in --work-dir; training checkpoints there too and
resumes after an interruption. The adapter (peft format) and its card go to --output.
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

from crosswhisper.training import TrainingConfig, WhisperTask, add_draft_arguments, draft_options, prepare_examples, train
from crosswhisper.whisper import LORA, get_bundle
from crosswhisper.whisper.cache import cache_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "LibriSpeech"
DEV_SPEAKERS = ("1088", "3526")  # held out: 81 + 55 utterances


def audio_files(subset: Path, speakers=None, exclude=()) -> list[Path]:
    files = sorted(p for p in subset.rglob("*") if p.suffix in (".flac", ".opus", ".ogg", ".wav"))
    return [p for p in files if (speakers is None or p.parts[-3] in speakers) and p.parts[-3] not in exclude]


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
    parser.add_argument("--init-adapter", type=Path, default=None, help="warm start from this adapter (same modules; its rank ≤ --rank)")
    parser.add_argument("--eval-gammas", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="caches and checkpoints")
    parser.add_argument("--output", type=Path, default=None, help="default: crosswhisper/adapters/<model>")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    bundle = get_bundle(args.model)
    task = WhisperTask(bundle)
    work = args.work_dir or cache_dir() / "training" / args.model
    output = args.output or ROOT / "crosswhisper" / "adapters" / args.model
    rng = random.Random(args.seed)
    train_files = audio_files(args.train_data, exclude=set(args.dev_speakers))
    rng.shuffle(train_files)
    train_files = sorted(train_files[: args.train_utterances])
    dev_files = audio_files(args.train_data, speakers=set(args.dev_speakers))
    rng.shuffle(dev_files)
    dev_files = sorted(dev_files[: args.dev_utterances])
    test_files = audio_files(args.test_data)

    t0 = time.perf_counter()
    train_examples = prepare_examples(bundle, train_files, cache_file=work / f"train-{len(train_files)}.pt")
    dev_examples = prepare_examples(bundle, dev_files, cache_file=work / f"dev-{len(dev_files)}.pt")
    test_examples = prepare_examples(bundle, test_files, cache_file=work / "test-clean.pt")
    prep_seconds = time.perf_counter() - t0

    config = TrainingConfig(
        gamma=args.gamma, rank=args.rank, steps=args.steps, seed=args.seed, lr=args.lr,
        cuts_per_utterance=args.cuts_per_utterance, utterances_per_step=args.utterances_per_step,
        replay_truth=args.replay_truth, **draft_options(args),
        init_adapter=str(args.init_adapter) if args.init_adapter else None,
    )
    t0 = time.perf_counter()
    adapted = train(task, train_examples, config, output_dir=work / config.run_name())
    train_seconds = time.perf_counter() - t0

    results = {}
    splits = (("dev", dev_examples, args.train_data), ("test-clean", test_examples, args.test_data))
    for split, examples, subset in splits:
        references = human_transcripts(subset)
        results[split] = [task.evaluate(adapted, examples, g, references) for g in args.eval_gammas]
        for r in results[split]:
            logging.info(
                "%s γ=%d: %.3f tokens/forward, %d mismatches, WER %.2f %%",
                split, r["gamma"], r["tokens_per_forward"], r["mismatches"], 100 * r["wer"],
            )
    card = {
        "base_model": args.model,
        "base_weights_sha256": bundle.weights_sha256,
        "lora": {"rank": args.rank, "alpha": args.rank, "target_modules": LORA.target_modules},
        "training": asdict(config),
        "data": {
            "train": f"{args.train_data.name}: {len(train_files)} utterances, speakers except {args.dev_speakers}",
            "dev": f"{args.train_data.name}: {len(dev_files)} utterances of speakers {args.dev_speakers}",
            "targets": "the base model's own greedy transcripts (no human transcripts)",
        },
        "wall_seconds": {"prepare": round(prep_seconds), "train": round(train_seconds)},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
        "tokens_per_forward": results,
    }
    task.export(adapted, output, card)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

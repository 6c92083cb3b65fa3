"""Train and export the predictive-stream adapter of a text LM (Algorithm 3 on `lm.py`).

    python recipes/train_lm_adapter.py                      # SmolLM2-135M-Instruct (offline)

The shipped adapter took three runs (replay-buffer drafts, resumed, then a warm start with
--draft-source previous-block); the exact commands are in its card
(crosswhisper/adapters/smollm2-135m-instruct/README.md).

Prompts (built offline, see `build_prompts`): chat requests about passages of public-domain
books — the LibriSpeech transcripts in ../shared/data/LibriSpeech/train-clean-5 — each wrapped
in one of `TEMPLATES` (continue, summarise, explain, rewrite, ...). The speakers in
--dev-speakers (other books) make the held-out prompt set. Targets are the base model's own
greedy continuations (self-distillation: no human answers). Continuations and checkpoints are
cached in --work-dir (training resumes after an interruption); the adapter (peft format) and
its card go to --output.

Data-parallel on several processes, unchanged, as recipes/train_whisper_adapter.py:

    accelerate launch --multi_gpu --num_processes 4 recipes/train_lm_adapter.py

(one optimizer step sees processes × --utterances-per-step prompts; a resume needs the same
number of processes).
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

from crosswhisper.lm import DEFAULT_LM, load_lm
from crosswhisper.training import (
    LMTask, Processes, TrainingConfig, add_draft_arguments, config_from_arguments, prepare_lm_examples, train,
)
from crosswhisper.whisper.cache import cache_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "LibriSpeech"
DEV_SPEAKERS = ("1088", "3526")  # held out, as for the Whisper adapters (other books)

# Each prompt is one of these requests about one transcript line ({text}).
TEMPLATES = (
    "Continue this passage from a novel: \"{text}\"",
    "Summarize this passage in one sentence: \"{text}\"",
    "Explain in simple words what happens here: \"{text}\"",
    "Rewrite this sentence in modern English: \"{text}\"",
    "Write a short story that begins with: \"{text}\"",
    "What questions might a reader ask about this text? \"{text}\"",
    "Describe the mood of this passage: \"{text}\"",
    "Translate this passage into plain, simple English for a child: \"{text}\"",
)


def transcript_lines(subset: Path, speakers=None, exclude=()) -> dict[str, str]:
    """utterance id → transcript text (LibriSpeech `.trans.txt`), sentence-cased."""
    lines = {}
    for trans in sorted(subset.rglob("*.trans.txt")):
        speaker = trans.parts[-3]
        if (speakers is not None and speaker not in speakers) or speaker in exclude:
            continue
        for line in trans.read_text().splitlines():
            utterance, _, text = line.partition(" ")
            text = text.lower().replace(" i ", " I ")
            lines[utterance] = text[:1].upper() + text[1:] + "."
    return lines


def build_prompts(lines: dict[str, str], count: int, seed: int) -> dict[str, list[dict]]:
    """`count` chat prompts, each a random template over a random transcript line."""
    rng = random.Random(seed)
    chosen = sorted(rng.sample(sorted(lines), min(count, len(lines))))
    return {u: [{"role": "user", "content": rng.choice(TEMPLATES).format(text=lines[u])}] for u in chosen}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_LM)
    parser.add_argument("--data", type=Path, default=SHARED / "train-clean-5")
    parser.add_argument("--dev-speakers", nargs="+", default=list(DEV_SPEAKERS))
    parser.add_argument("--train-prompts", type=int, default=320)
    parser.add_argument("--dev-prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--generate-batch", type=int, default=16, help="prompts per generate call (training set)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cuts-per-utterance", type=int, default=16)
    parser.add_argument("--utterances-per-step", type=int, default=1)
    parser.add_argument("--lr", type=float, default=TrainingConfig.lr)
    parser.add_argument("--replay-truth", type=float, default=0.0, help="true tokens in the initial replay buffer")
    add_draft_arguments(parser)
    parser.add_argument("--init-adapter", type=Path, default=None, help="warm start from this adapter (same modules; its rank ≤ --rank)")
    parser.add_argument("--eval-gammas", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint-every", type=int, default=TrainingConfig.checkpoint_every, help="steps between checkpoints (resume points)"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="caches and checkpoints")
    parser.add_argument("--output", type=Path, default=None, help="default: crosswhisper/adapters/<model>")
    args = parser.parse_args(argv)
    processes = Processes.from_environment()  # one, or those of `accelerate launch`
    logging.basicConfig(level=logging.INFO if processes.is_main else logging.WARNING, format="%(levelname)s: %(message)s")

    # the main process loads the model and computes the continuations' caches, the others then read them
    with processes.main_process_first():
        lm = load_lm(args.model)
    task = LMTask(lm)
    name = Path(args.model).stem if args.model.endswith(".gguf") else args.model.replace("/", "--")
    work = args.work_dir or cache_dir() / "training" / name
    output = args.output or ROOT / "crosswhisper" / "adapters" / name
    train_prompts = build_prompts(transcript_lines(args.data, exclude=set(args.dev_speakers)), args.train_prompts, args.seed)
    dev_prompts = build_prompts(transcript_lines(args.data, speakers=set(args.dev_speakers)), args.dev_prompts, args.seed)

    t0 = time.perf_counter()
    with processes.main_process_first():
        train_examples = prepare_lm_examples(
            lm, train_prompts, max_new_tokens=args.max_new_tokens, batch_size=args.generate_batch,
            cache_file=work / f"train-{len(train_prompts)}-{args.max_new_tokens}.pt",
        )
        dev_examples = prepare_lm_examples(
            lm, dev_prompts, max_new_tokens=args.max_new_tokens, cache_file=work / f"dev-{len(dev_prompts)}-{args.max_new_tokens}.pt"
        )
    prep_seconds = time.perf_counter() - t0

    config = config_from_arguments(args)
    t0 = time.perf_counter()
    adapted = train(task, train_examples, config, output_dir=work / config.run_name(), processes=processes)
    train_seconds = time.perf_counter() - t0
    if not processes.main_only():  # every process holds the same adapter: the main one evaluates and exports it
        return 0

    results = [task.evaluate(adapted, dev_examples, g) for g in args.eval_gammas]
    for r in results:
        logging.info("held-out γ=%d: %.3f tokens/forward, %d mismatches", r["gamma"], r["tokens_per_forward"], r["mismatches"])
    threads = f"{torch.get_num_threads()} torch threads"
    card = {
        "base_model": args.model,
        "lora": {"rank": args.rank, "alpha": args.rank, "target_modules": "all-linear (attention + MLP of every layer)",
                 "saved_dtype": "float16"},
        # processes: data-parallel (accelerate launch), an optimizer step saw processes × utterances_per_step prompts
        "training": {**asdict(config), "processes": processes.count},
        "data": {
            "train": f"{len(train_examples)} chat prompts over {args.data.name} transcript lines, speakers except {args.dev_speakers}",
            "held_out": f"{len(dev_examples)} chat prompts over transcript lines of speakers {args.dev_speakers}",
            "templates": list(TEMPLATES),
            "targets": f"the base model's own greedy continuations, at most {args.max_new_tokens} tokens",
        },
        "wall_seconds": {"prepare": round(prep_seconds), "train": round(train_seconds)},
        "machine": f"{platform.machine()}, "
        + (f"{processes.count} processes × {threads}" if processes.count > 1 else threads)
        + f", {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
        "tokens_per_forward": {"held_out": results},
    }
    task.export(adapted, output, card)
    # the held-out prompt set travels with the adapter: tests and eval/lm_benchmark.py read it
    (output / "held_out_prompts.json").write_text(json.dumps(dev_prompts, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(results, indent=2))
    processes.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

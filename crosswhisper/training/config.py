"""The training run's settings (`TrainingConfig`) and the recipes' options for how drafts are made."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class TrainingConfig:
    gamma: int = 16  # draft slots per block, as at inference
    rank: int = 32  # LoRA rank (alpha = rank)
    steps: int = 1000  # optimizer steps
    utterances_per_step: int = 2  # gradient accumulation over utterances
    cuts_per_utterance: int = 8  # blocks (rows) per utterance and step
    lr: float = 5e-4  # AdamW, cosine schedule
    warmup: float = 0.03  # fraction of steps with linear warm-up
    replace_prob: float = 0.15  # extra random replacement of replayed drafts
    placeholder_prob: float = 0.5  # chance that a block's tail holds placeholders (as at inference)
    # share of true tokens in the replay buffer before the student's first predictions replace
    # them (the rest random). With few visits per position (long texts, few steps) most drafts
    # are still these initial ones: truth then teaches the student to echo its drafts, which
    # inference never rewards (LM run: 0.5 → 1.13 tokens/forward; see the LM adapter's card).
    replay_truth: float = 0.5
    # where a block's drafts come from. "replay": the replay buffer as is (a position's entry
    # is the student's latest prediction of it from any slot, slot 0's next-token guesses
    # included). "previous-block": the student's own drafts from the block one position
    # earlier (no gradient; its drafts come from the buffer), which is what inference
    # feeds after a rejection at the first draft; only such ≥ 2-ahead drafts enter the buffer.
    draft_source: str = "replay"
    # with previous-block drafts: chance that the previous block's draft for the cut position
    # is made wrong (the student's own first choice if wrong, else its second choice). At
    # inference a block starts at a position because the draft there was just rejected, so
    # its drafts were made next to a wrong token; replayed drafts are mostly right instead.
    rejected_draft_prob: float = 0.0
    # with previous-block drafts: how many earlier blocks are chained, each one position before
    # the next and each feeding it its drafts (1: the block at cut − 1 reads the replay buffer;
    # 2: that block's drafts come from the block at cut − 2, as at inference after two
    # one-token passes). One more no-grad student pass per extra block.
    previous_blocks: int = 1
    # loss only on the slots whose predictions inference reuses. After a pass commits its
    # drafts d_1..d_n (the longest right prefix), the next block's drafts are this pass's
    # predictions at slots n+1..γ: slot j is reused only when the block's first wrong (or
    # empty) draft is at a slot ≤ j. Training on every slot mostly teaches blocks whose drafts
    # are right, a state whose predictions inference throws away. Measured: no gain as an
    # 800-step warm-start stage for tiny.en (its card), so off by default and not shipped.
    reused_slots_only: bool = False
    # warm start: a peft adapter directory of the same modules and a rank ≤ rank (None = zero delta)
    init_adapter: Optional[str] = None
    seed: int = 0
    checkpoint_every: int = 200  # steps between checkpoints (resume point)

    def __post_init__(self):
        if self.draft_source not in ("replay", "previous-block"):
            raise ValueError(f"draft_source must be 'replay' or 'previous-block', got {self.draft_source!r}")
        if not 0.0 <= self.rejected_draft_prob <= 1.0:
            raise ValueError(f"rejected_draft_prob must be in [0, 1], got {self.rejected_draft_prob}")
        if self.rejected_draft_prob and self.draft_source != "previous-block":
            raise ValueError("rejected_draft_prob needs draft_source='previous-block'")
        if self.previous_blocks < 1 or (self.previous_blocks > 1 and self.draft_source != "previous-block"):
            raise ValueError(f"previous_blocks must be ≥ 1 (> 1 needs draft_source='previous-block'), got {self.previous_blocks}")

    def run_name(self) -> str:
        """A checkpoint directory name that tells runs of different configurations apart."""
        name = f"run-g{self.gamma}-r{self.rank}-s{self.steps}-c{self.cuts_per_utterance}-u{self.utterances_per_step}"
        default = TrainingConfig()
        if self.replay_truth != default.replay_truth:
            name += f"-t{self.replay_truth:g}"
        if self.lr != default.lr:
            name += f"-lr{self.lr:g}"
        if self.draft_source != default.draft_source:
            name += f"-{self.draft_source}"
        if self.rejected_draft_prob != default.rejected_draft_prob:
            name += f"-rej{self.rejected_draft_prob:g}"
        if self.previous_blocks != default.previous_blocks:
            name += f"-chain{self.previous_blocks}"
        if self.reused_slots_only:
            name += "-reused"
        if self.init_adapter:
            name += f"-from-{Path(self.init_adapter).name}"
        return name


DRAFT_FIELDS = ("draft_source", "rejected_draft_prob", "previous_blocks", "reused_slots_only")


def add_draft_arguments(parser) -> None:
    """The recipes' command-line options for how training blocks are made, as at inference
    (the `TrainingConfig` fields of DRAFT_FIELDS; `draft_options(args)` reads them back)."""
    parser.add_argument(
        "--draft-source", choices=("replay", "previous-block"), default=TrainingConfig.draft_source,
        help="training drafts: the replay buffer, or the student's drafts from the block one position earlier",
    )
    parser.add_argument(
        "--rejected-draft-prob", type=float, default=TrainingConfig.rejected_draft_prob,
        help="with previous-block drafts: chance that the earlier block's draft at the cut is a wrong one, as at inference",
    )
    parser.add_argument(
        "--previous-blocks", type=int, default=TrainingConfig.previous_blocks,
        help="with previous-block drafts: earlier blocks chained, each feeding the next its drafts",
    )
    parser.add_argument(
        "--reused-slots-only", action="store_true",
        help="loss only on the slots whose predictions inference reuses (after the block's first wrong draft)",
    )


def draft_options(args) -> dict:
    """The DRAFT_FIELDS of TrainingConfig from arguments parsed with `add_draft_arguments`."""
    return {name: getattr(args, name) for name in DRAFT_FIELDS}


def config_from_arguments(args) -> TrainingConfig:
    """The TrainingConfig of a recipe's command line (both recipes share these flags)."""
    return TrainingConfig(
        gamma=args.gamma, rank=args.rank, steps=args.steps, seed=args.seed, lr=args.lr,
        cuts_per_utterance=args.cuts_per_utterance, utterances_per_step=args.utterances_per_step,
        replay_truth=args.replay_truth, **draft_options(args),
        init_adapter=str(args.init_adapter) if args.init_adapter else None, checkpoint_every=args.checkpoint_every,
    )

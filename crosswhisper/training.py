"""Training the predictive stream: LoRA denoising distillation (Algorithm 3, DESIGN §1.4).

Self-distillation: the frozen base model transcribes the training audio greedily (Whisper; no
human transcripts) or continues the training prompts (text LMs); the teacher is the control
stream on those tokens. The student (adapter on) reads the block it will read at inference — the last committed token x_c and γ noisy drafts,
attending to the *control stream's* keys/values of the prefix (as `dual_stream.HFDualStream`
does), causally at x_c and bidirectionally among the drafts — and is trained with

    s_T = 0 ;  s_t = (s_{t+1} + 1) · 1[argmax q_{t+1} = x_{t+1}]
    L   = − Σ_t (s_t + 1) · p_tᵀ log q_t  /  Σ_t (s_t + 1)

The drafts come from a per-utterance replay buffer of the student's own past argmax
predictions (what inference feeds it), plus random replacement and placeholder tails; or,
closer to inference, from the student's own pass over the block one position earlier, whose
draft at the cut is a wrong one (`draft_source="previous-block"`, `rejected_draft_prob`): at
inference a block starts where the previous block's draft was just rejected.

One step on one utterance costs one teacher pass (no grad; its self-attention keys/values
are the prefix of every cut, and its cross-attention keys/values are shared by all rows) and
one student pass over `cuts` blocks of γ+1 tokens. Encoder outputs and transcripts are
computed once (`prepare_examples`) and cached on disk: this is what makes CPU training practical.

The loop (`train`, `distillation_step`) is model-agnostic: a model enters through a
`DistillationTask` — `WhisperTask` (encoder-decoder, audio) or `LMTask` (decoder-only text).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import torch
from tqdm import tqdm

from .audio import load_audio
from .decoding import DecodeOptions
from .dual_stream import AdaptedModel, check_adapter_record, project
from .lm import LanguageModel
from .whisper import (
    decode_window,
    decoder_prompt,
    encode,
    logits_processor,
    new_adapter,
    save_adapter,
    special_id,
)
from .models import WhisperBundle

logger = logging.getLogger(__name__)


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


@dataclass
class Example:
    utterance: str  # utterance (or prompt) id
    encoder_states: Optional[torch.Tensor]  # [1, frames, d_model], float16 to halve memory; None for text
    tokens: torch.Tensor  # [L] prompt + the base model's own greedy output (+ end token)
    prompt_length: int


class DistillationTask(Protocol):
    """What Algorithm 3 needs from a model: its teacher pass and its student's block forward."""

    name: str  # the base model's name (messages)
    weights_sha256: Optional[str]  # its weights' fingerprint: adapters record it
    vocab_size: int
    placeholder_id: int  # the token of empty draft slots (as at inference)

    def new_adapter(self, rank: int, seed: int) -> AdaptedModel:
        """A fresh (zero-delta) LoRA adapter on a private copy of the model."""

    def teacher_pass(self, example: Example) -> tuple[torch.Tensor, object]:
        """Control stream over the whole example: distributions [L, V] (row t = P(x_{t+1} | x_≤t))
        and its caches (the prefix keys/values the student reads)."""

    def student_logits(
        self, adapted: AdaptedModel, example: Example, cuts: torch.Tensor, drafts: torch.Tensor, cache
    ) -> torch.Tensor:
        """Predictive-stream logits [rows, γ+1, V] for blocks [x_cut, d_1..d_γ], as at inference."""


def prepare_examples(
    bundle: WhisperBundle, audio_paths: Sequence[Path], *, cache_file: Optional[Path] = None
) -> list[Example]:
    """Encoder outputs and the base model's greedy transcripts (our exact γ=0 loop) per file."""
    if cache_file is not None and cache_file.exists():
        stored = torch.load(cache_file, weights_only=False)
        if stored.get("paths") == [str(p) for p in audio_paths] and stored.get("model") == bundle.weights_sha256:
            return stored["examples"]
        logger.info("%s is for other audio or weights; recomputing", cache_file)
    examples = []
    prompt = decoder_prompt(bundle, "en")
    for path in tqdm(audio_paths, desc="teacher transcripts", unit="utt"):
        hidden = encode(bundle, load_audio(path)[: 30 * 16000])
        result = decode_window(bundle, hidden, prompt, adapted=None, options=DecodeOptions(gamma=0))
        examples.append(
            Example(
                utterance=Path(path).stem,
                encoder_states=hidden.to(torch.float16),
                tokens=torch.tensor(prompt + result.tokens),
                prompt_length=len(prompt),
            )
        )
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".partial")
        torch.save({"paths": [str(p) for p in audio_paths], "model": bundle.weights_sha256, "examples": examples}, tmp)
        tmp.replace(cache_file)
    return examples


def prepare_lm_examples(
    lm: LanguageModel,
    prompts: dict,
    *,
    max_new_tokens: int,
    batch_size: int = 1,
    cache_file: Optional[Path] = None,
) -> list[Example]:
    """The base LM's own greedy continuation of every prompt (id → text or chat messages).

    batch_size 1 uses our exact γ=0 loop (the held-out sets: lossless decoding must reproduce
    them token for token); larger batches use transformers `generate` with left padding, several
    times faster on a CPU, whose padded rows may differ from single-row greedy by float
    rounding in rare near-ties: harmless for training targets.
    """
    from .lm import decode_tokens, encode_prompt

    key = {"prompts": prompts, "model": lm.weights_sha256, "max_new_tokens": max_new_tokens, "batch": batch_size}
    if cache_file is not None and cache_file.exists():
        stored = torch.load(cache_file, weights_only=False)
        if stored.get("key") == key:
            return stored["examples"]
        logger.info("%s is for other prompts or weights; recomputing", cache_file)
    encoded = [(name, encode_prompt(lm, prompt)) for name, prompt in prompts.items()]
    continuations = {}
    progress = tqdm(total=len(encoded), desc="teacher continuations", unit="prompt")
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        if batch_size == 1:
            name, ids = batch[0]
            continuations[name] = decode_tokens(
                lm, ids, adapted=None, options=DecodeOptions(gamma=0, max_new_tokens=max_new_tokens)
            ).tokens
        else:
            continuations.update(_generate_batch(lm, batch, max_new_tokens))
        progress.update(len(batch))
    progress.close()
    examples = [
        Example(utterance=name, encoder_states=None, tokens=torch.tensor(ids + continuations[name]), prompt_length=len(ids))
        for name, ids in encoded
        if continuations[name]
    ]
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".partial")
        torch.save({"key": key, "examples": examples}, tmp)
        tmp.replace(cache_file)
    return examples


def _generate_batch(lm: LanguageModel, batch: list[tuple[str, list[int]]], max_new_tokens: int) -> dict:
    """Greedy continuations of several prompts in one `generate` call (left padding)."""
    pad = lm.eos_token_ids[0]
    width = max(len(ids) for _, ids in batch)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in batch])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in batch])
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=list(lm.eos_token_ids), pad_token_id=pad, top_k=None, top_p=None, temperature=None,
        )
    continuations = {}
    for (name, _), row in zip(batch, out[:, width:].tolist()):
        stop = next((i for i, token in enumerate(row) if token in lm.eos_token_ids), None)
        continuations[name] = row if stop is None else row[: stop + 1]
    return continuations


def _teacher_pass(bundle: WhisperBundle, example: Example):
    """Base model over the whole transcript: processed teacher distributions and both caches."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    decoder = bundle.model.model.decoder
    hidden = example.encoder_states.to(bundle.model.dtype)
    tokens = example.tokens.unsqueeze(0)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.no_grad():
        out = decoder(input_ids=tokens, encoder_hidden_states=hidden, past_key_values=cache, use_cache=True)
        logits = project(out.last_hidden_state, bundle.model.proj_out)
        index = torch.arange(tokens.shape[1])
        logits = logits_processor(bundle, example.prompt_length)(logits, index + 1)
        teacher = logits.softmax(-1)[0]  # [L, V]: row t = P(x_{t+1} | x_≤t)
    return teacher, cache


def _student_cache(teacher_cache, rows: int):
    """The teacher's caches repeated for `rows` student rows (prefix = control stream's keys)."""
    from transformers.cache_utils import EncoderDecoderCache

    return EncoderDecoderCache(
        _repeat_cache(teacher_cache.self_attention_cache, rows), _repeat_cache(teacher_cache.cross_attention_cache, rows)
    )


def block_mask(cuts: torch.Tensor, cached: int, block: int, dtype) -> torch.Tensor:
    """Additive mask [rows, 1, block, cached+block]: row i sees cached positions < cut_i (the
    committed prefix before x_c), x_c sees itself, drafts see x_c and every draft."""
    rows = cuts.shape[0]
    allowed = torch.zeros(rows, 1, block, cached + block, dtype=torch.bool)
    allowed[:, 0, :, :cached] = torch.arange(cached).view(1, 1, -1) < cuts.view(-1, 1, 1)
    allowed[:, 0, 0, cached] = True
    allowed[:, 0, 1:, cached:] = True
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def suffix_weights(hits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(s_t + 1) with s_T = 0, s_t = (s_{t+1} + 1)·hit_{t+1}: a position is worth more when the
    predictions after it are right, because getting it right unlocks that whole run."""
    s = torch.zeros_like(hits, dtype=torch.float32)
    for t in range(hits.shape[1] - 2, -1, -1):
        s[:, t] = (s[:, t + 1] + 1) * hits[:, t + 1]
    return (s + 1) * valid


class ReplayBuffer:
    """Per utterance, the student's latest argmax prediction for every position (its drafts),
    and its second choice there (a plausible wrong draft, see `rejected_draft_prob`)."""

    def __init__(
        self,
        examples: Sequence[Example],
        gamma: int,
        vocab: int,
        placeholder: int,
        generator,
        truth: float = 0.5,
        *,
        alternatives: bool = False,
    ):
        self.vocab = vocab
        self.predictions = {}
        # second choices, kept only for runs that need wrong drafts: their random start draws
        # from the generator, and runs without them must reproduce as before
        self.alternatives = {}
        for ex in examples:
            # start from the truth corrupted at 1 - truth: early drafts are poor, as at inference
            noisy = ex.tokens.clone()
            flip = torch.rand(noisy.shape, generator=generator) < 1.0 - truth
            noisy[flip] = torch.randint(vocab, (int(flip.sum()),), generator=generator)
            self.predictions[ex.utterance] = torch.cat([noisy, torch.full((gamma + 1,), placeholder)])
            if alternatives:  # random until the student's second choices replace them
                self.alternatives[ex.utterance] = torch.randint(vocab, (noisy.shape[0] + gamma + 1,), generator=generator)

    def drafts(self, ex: Example, cuts: torch.Tensor, gamma: int) -> torch.Tensor:
        index = cuts.view(-1, 1) + torch.arange(1, gamma + 1).view(1, -1)
        return self.predictions[ex.utterance][index]

    def update(self, ex: Example, cuts: torch.Tensor, argmax: torch.Tensor, second: Optional[torch.Tensor] = None) -> None:
        index = cuts.view(-1, 1) + torch.arange(1, argmax.shape[1] + 1).view(1, -1)
        self.predictions[ex.utterance][index] = argmax
        if second is not None and ex.utterance in self.alternatives:
            self.alternatives[ex.utterance][index] = second

    def wrong_draft(self, ex: Example, positions: torch.Tensor) -> torch.Tensor:
        """A draft for each position that is not the true token: the student's latest first
        choice if it is wrong, else its second choice."""
        truth = ex.tokens[positions]
        first = self.predictions[ex.utterance][positions]
        second = self.alternatives[ex.utterance][positions]
        second = torch.where(second == truth, (truth + 1) % self.vocab, second)  # only a random start can tie
        return torch.where(first != truth, first, second)


def student_logits(
    adapted: AdaptedModel, example: Example, cuts: torch.Tensor, drafts: torch.Tensor, teacher_cache
) -> torch.Tensor:
    """Predictive-stream logits [rows, γ+1, V] for blocks [x_cut, d_1..d_γ], exactly as
    `HFDualStream` computes its predictive row: the prefix keys/values are the control
    stream's (the teacher pass), the block runs with the adapter on."""
    rows, gamma = drafts.shape
    L = example.tokens.shape[0]
    block = torch.cat([example.tokens[cuts].view(-1, 1), drafts], dim=1)
    positions = cuts.view(-1, 1) + torch.arange(gamma + 1).view(1, -1)
    whisper = adapted.peft_model.base_model.model
    adapted.gate.gate = None  # adapter on in every row: all rows are predictive
    hidden = whisper.model.decoder(
        input_ids=block,
        encoder_hidden_states=example.encoder_states.to(whisper.dtype).expand(rows, -1, -1),
        past_key_values=_student_cache(teacher_cache, rows),
        position_ids=positions,
        attention_mask=block_mask(cuts, L, gamma + 1, whisper.dtype),
        use_cache=True,
    ).last_hidden_state
    return project(hidden, whisper.proj_out)


def _repeat_cache(cache, rows: int):
    """A DynamicCache's keys/values repeated (as views) for `rows` student rows."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache([(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)) for layer in cache.layers])


class WhisperTask:
    """Algorithm 3 on a Whisper decoder (the audio enters through the cached encoder states)."""

    def __init__(self, bundle: WhisperBundle):
        self.bundle = bundle
        self.name, self.weights_sha256 = bundle.name, bundle.weights_sha256
        self.vocab_size = bundle.model.config.vocab_size
        self.placeholder_id = special_id(bundle, "<|endoftext|>")

    def new_adapter(self, rank: int, seed: int) -> AdaptedModel:
        return new_adapter(self.bundle, rank=rank, seed=seed)

    def teacher_pass(self, example: Example):
        return _teacher_pass(self.bundle, example)

    def student_logits(self, adapted, example, cuts, drafts, cache) -> torch.Tensor:
        return student_logits(adapted, example, cuts, drafts, cache)


class LMTask:
    """Algorithm 3 on a decoder-only text LM (`lm.LanguageModel`)."""

    def __init__(self, lm: LanguageModel):
        self.lm = lm
        self.name, self.weights_sha256 = lm.name, lm.weights_sha256
        self.vocab_size = lm.model.config.vocab_size
        self.placeholder_id = lm.placeholder_id

    def new_adapter(self, rank: int, seed: int) -> AdaptedModel:
        from .lm import new_adapter as new_lm_adapter

        return new_lm_adapter(self.lm, rank=rank, seed=seed)

    def teacher_pass(self, example: Example):
        from transformers.cache_utils import DynamicCache

        model = self.lm.model
        with torch.no_grad():
            hidden = model.get_decoder()(
                input_ids=example.tokens.unsqueeze(0).to(model.device),
                past_key_values=DynamicCache(config=model.config),
                use_cache=True,
            )
            teacher = project(hidden.last_hidden_state, model.get_output_embeddings()).softmax(-1)[0]
        return teacher, hidden.past_key_values

    def student_logits(self, adapted, example, cuts, drafts, cache) -> torch.Tensor:
        rows, gamma = drafts.shape
        block = torch.cat([example.tokens[cuts].view(-1, 1), drafts], dim=1)
        causal_lm = adapted.peft_model.base_model.model
        adapted.gate.gate = None  # adapter on in every row: all rows are predictive
        hidden = causal_lm.get_decoder()(
            input_ids=block,
            past_key_values=_repeat_cache(cache, rows),
            position_ids=cuts.view(-1, 1) + torch.arange(gamma + 1).view(1, -1),
            attention_mask=block_mask(cuts, example.tokens.shape[0], gamma + 1, causal_lm.dtype),
            use_cache=True,
        ).last_hidden_state
        return project(hidden, causal_lm.get_output_embeddings())


def as_task(model: Union[WhisperBundle, LanguageModel, DistillationTask]) -> DistillationTask:
    if isinstance(model, WhisperBundle):
        return WhisperTask(model)
    if isinstance(model, LanguageModel):
        return LMTask(model)
    return model


def distillation_step(
    task: Union[WhisperBundle, LanguageModel, DistillationTask],
    adapted: AdaptedModel,
    example: Example,
    replay: ReplayBuffer,
    config: TrainingConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict]:
    """Loss of one utterance (backward not called) and statistics."""
    task = as_task(task)
    gamma, rows = config.gamma, config.cuts_per_utterance
    placeholder, vocab = task.placeholder_id, task.vocab_size
    L = example.tokens.shape[0]
    teacher, cache = task.teacher_pass(example)

    # x_c = tokens[cut]: the last committed token; at least one target must follow it
    low, high = example.prompt_length - 1, L - 2
    cuts = torch.randint(low, high + 1, (rows,), generator=generator)
    if config.draft_source == "previous-block":
        drafts = _previous_block_drafts(
            task, adapted, example, cuts, replay, gamma, low, cache, config.rejected_draft_prob, generator,
            depth=config.previous_blocks,
        )
    else:
        drafts = replay.drafts(example, cuts, gamma)
    replace = torch.rand(drafts.shape, generator=generator) < config.replace_prob
    drafts = torch.where(replace, torch.randint(vocab, drafts.shape, generator=generator), drafts)
    tail_start = torch.randint(1, gamma + 1, (rows, 1), generator=generator)
    with_tail = torch.rand((rows, 1), generator=generator) < config.placeholder_prob
    tail = with_tail & (torch.arange(gamma).view(1, -1) >= tail_start)
    draft_positions = cuts.view(-1, 1) + torch.arange(1, gamma + 1).view(1, -1)
    drafts = torch.where(tail | (draft_positions >= L), torch.full_like(drafts, placeholder), drafts)

    log_q = task.student_logits(adapted, example, cuts, drafts, cache).log_softmax(-1)  # [rows, γ+1, V]
    positions = cuts.view(-1, 1) + torch.arange(gamma + 1).view(1, -1)

    # targets: row i, slot j predicts position cut_i + j + 1
    target_pos = positions + 1
    valid = target_pos < L
    safe = target_pos.clamp_max(L - 1)
    p = teacher[safe - 1]  # teacher row t-1 predicts position t
    targets = example.tokens[safe]
    with torch.no_grad():
        argmax = log_q.argmax(-1)
        hits = (argmax == targets) & valid
        weights = suffix_weights(hits, valid)
        if config.reused_slots_only:
            weights = weights * reused_slots(drafts, example.tokens, cuts)
    cross_entropy = -(p * log_q).sum(-1)  # [rows, γ+1]
    loss = (weights * cross_entropy).sum() / weights.sum().clamp_min(1.0)
    if config.draft_source == "replay":
        replay.update(example, cuts, argmax[:, :gamma])
    # drafts accepted in a row from slot 1 on if this block were verified: a live τ proxy
    run = (hits.long().cumprod(-1)).sum(-1).float()
    return loss, {"hits": hits.sum().item() / max(valid.sum().item(), 1), "run": run.mean().item()}


def reused_slots(drafts: torch.Tensor, tokens: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """[rows, γ+1] True at the slots whose predictions the next block would draft with if
    this block were verified: slots after the n drafts it commits (n = leading drafts equal
    to the true tokens; a placeholder or a position past the end is never right)."""
    gamma = drafts.shape[1]
    positions = cuts.view(-1, 1) + torch.arange(1, gamma + 1).view(1, -1)
    inside = positions < tokens.shape[0]
    right = inside & (drafts == tokens[positions.clamp_max(tokens.shape[0] - 1)])
    committed = right.long().cumprod(-1).sum(-1, keepdim=True)  # n
    return torch.arange(gamma + 1).view(1, -1) > committed


def _previous_block_drafts(
    task, adapted, example, cuts, replay, gamma, low, cache, rejected_prob=0.0, generator=None, depth=1
) -> torch.Tensor:
    """Drafts for blocks at `cuts` as inference makes them after rejecting the first draft of a
    block at cut − 1: that block's predictions at slots 1..γ (positions cut+1..cut+γ). With
    `rejected_prob`, that block's draft for position cut is a wrong one (it was rejected). That
    block's own drafts come from the replay buffer (depth 1) or, recursively, from the block
    before it (depth > 1). Rows at the first possible cut get placeholders, as the first call
    of a decode does."""
    previous = (cuts - 1).clamp_min(low)
    if depth > 1:
        previous_drafts = _previous_block_drafts(
            task, adapted, example, previous, replay, gamma, low, cache, rejected_prob, generator, depth - 1
        )
    else:
        previous_drafts = replay.drafts(example, previous, gamma)
    if rejected_prob:
        rejected = torch.rand(cuts.shape, generator=generator) < rejected_prob
        wrong = replay.wrong_draft(example, previous + 1)
        previous_drafts[:, 0] = torch.where(rejected, wrong, previous_drafts[:, 0])
    with torch.no_grad():
        logits = task.student_logits(adapted, example, previous, previous_drafts, cache)
    top2 = logits[:, 1:].topk(2, dim=-1).indices
    drafts, second = top2[..., 0], top2[..., 1]
    first = cuts == low
    drafts[first] = task.placeholder_id
    replay.update(example, cuts[~first], drafts[~first], second[~first])
    return drafts


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


def _warm_start(task: DistillationTask, adapted: AdaptedModel, directory: Path) -> None:
    """Copy a saved adapter's weights into the fresh one (same modules, same base). A saved
    adapter of a lower rank fills the first ranks (`_grow_rank`): the same function to start with."""
    from peft import load_peft_weights, set_peft_model_state_dict

    check_adapter_record(directory, name=task.name, weights_sha256=task.weights_sha256, vocab_size=task.vocab_size)
    weights = load_peft_weights(str(directory), device="cpu")
    saved = json.loads((directory / "adapter_config.json").read_text())
    weights = _grow_rank(adapted, weights, saved["lora_alpha"] / saved["r"])
    try:
        loaded = set_peft_model_state_dict(adapted.peft_model, weights)
    except RuntimeError as error:  # another rank
        raise ValueError(f"cannot warm-start from {directory}: {error}") from None
    if loaded.unexpected_keys:
        raise ValueError(f"cannot warm-start from {directory}: it adapts other modules ({loaded.unexpected_keys[:3]} ...)")
    logger.info("warm start from %s", directory)


def _grow_rank(adapted: AdaptedModel, weights: dict, saved_scaling: float) -> dict:
    """Saved LoRA weights of rank r₀ placed into this adapter's rank r ≥ r₀: A's first r₀ rows
    and B's first r₀ columns (B rescaled to this adapter's alpha / r), the fresh adapter's
    random A rows and zero B columns for the rest. The delta B·A·scaling is unchanged, and the
    new ranks still learn (a zero A row would leave its B column without gradient)."""
    from peft import get_peft_model_state_dict

    config = adapted.peft_model.peft_config[adapted.peft_model.active_adapter]
    scaling = config.lora_alpha / config.r
    fresh = get_peft_model_state_dict(adapted.peft_model)
    grown = {}
    for key, saved in weights.items():
        target = fresh.get(key)
        if target is None or target.shape == saved.shape and saved_scaling == scaling:
            grown[key] = saved
            continue
        rank = saved.shape[0] if "lora_A" in key else saved.shape[1]
        if rank > config.r:
            raise ValueError(f"cannot warm-start a rank-{config.r} adapter from one of rank {rank}")
        value = target.detach().clone()
        if "lora_A" in key:
            value[:rank] = saved
        else:
            value[:, :rank] = saved * (saved_scaling / scaling)
        grown[key] = value
    return grown


def train(
    task: Union[WhisperBundle, LanguageModel, DistillationTask],
    examples: Sequence[Example],
    config: TrainingConfig,
    *,
    output_dir: Path,
    resume: bool = True,
) -> AdaptedModel:
    """Train a LoRA adapter with checkpoints in output_dir/checkpoint (resumed when present)."""
    from transformers import get_cosine_schedule_with_warmup

    task = as_task(task)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    adapted = task.new_adapter(config.rank, config.seed)
    if config.init_adapter:
        _warm_start(task, adapted, Path(config.init_adapter))
    model = adapted.peft_model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup * config.steps), config.steps)
    replay = ReplayBuffer(
        examples, config.gamma, task.vocab_size, task.placeholder_id, generator, config.replay_truth,
        alternatives=config.rejected_draft_prob > 0,
    )
    checkpoint = output_dir / "checkpoint"
    step = 0
    if resume and (checkpoint / "state.pt").exists():
        state = torch.load(checkpoint / "state.pt", weights_only=False)
        from peft import set_peft_model_state_dict

        stored = {k: v for k, v in state.get("config", {}).items() if k not in ("steps", "checkpoint_every")}
        wanted = {k: v for k, v in asdict(config).items() if k not in ("steps", "checkpoint_every") and k in stored}
        if stored != wanted:
            raise ValueError(f"{checkpoint} holds a run with another configuration ({stored}); use another output_dir")

        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        replay.predictions = state["replay"]
        replay.alternatives = state.get("replay_alternatives", replay.alternatives)
        generator.set_state(state["generator"])
        step = state["step"]
        logger.info("resumed from step %d", step)

    order = list(range(len(examples)))
    started = time.perf_counter()
    progress = tqdm(total=config.steps, initial=step, desc="distillation", unit="step")
    while step < config.steps:
        optimizer.zero_grad(set_to_none=True)
        stats = []
        for _ in range(config.utterances_per_step):
            example = examples[order[int(torch.randint(len(order), (1,), generator=generator))]]
            loss, info = distillation_step(task, adapted, example, replay, config, generator)
            (loss / config.utterances_per_step).backward()
            stats.append((loss.item(), info["hits"], info["run"]))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        progress.update(1)
        progress.set_postfix(
            loss=f"{sum(s[0] for s in stats) / len(stats):.3f}",
            hit=f"{sum(s[1] for s in stats) / len(stats):.2f}",
            run=f"{sum(s[2] for s in stats) / len(stats):.2f}",
        )
        if step % config.checkpoint_every == 0 or step == config.steps:
            from peft import get_peft_model_state_dict

            checkpoint.mkdir(parents=True, exist_ok=True)
            state = {
                "adapter": get_peft_model_state_dict(model),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "replay": replay.predictions,
                "replay_alternatives": replay.alternatives,
                "generator": generator.get_state(),
                "step": step,
                "config": asdict(config),
            }
            torch.save(state, checkpoint / "state.partial")
            (checkpoint / "state.partial").replace(checkpoint / "state.pt")
    progress.close()
    model.eval()
    logger.info("trained %d steps in %.0f s (this run)", config.steps, time.perf_counter() - started)
    return adapted


def export_adapter(adapted: AdaptedModel, bundle: WhisperBundle, directory: Path, card: dict) -> None:
    """Save the adapter in peft format with its record (crosswhisper_adapter.json) and a card."""
    directory.mkdir(parents=True, exist_ok=True)
    save_adapter(adapted.peft_model, directory, bundle, **card)
    lines = [f"# Predictive-stream adapter for Whisper {card.get('base_model', bundle.name)}", ""]
    lines += ["Made by `recipes/train_whisper_adapter.py`; every figure below comes from that run.", ""]
    lines += ["```json", json.dumps(card, indent=2), "```", ""]
    (directory / "README.md").write_text("\n".join(lines))


def tokens_per_forward(
    model: Union[WhisperBundle, LanguageModel],
    adapted: AdaptedModel,
    examples: Sequence[Example],
    gamma: int,
    references: Optional[dict[str, str]] = None,
) -> dict:
    """Lossless greedy decode of every example: tokens per forward, mismatches vs the teacher and,
    for Whisper given human transcripts per utterance id, the WER of the decoded text."""
    from .lm import decode_tokens
    from .metrics import word_error_rate

    tokens = calls = mismatches = 0
    hypotheses = {}
    for ex in examples:
        prompt = ex.tokens[: ex.prompt_length].tolist()
        if isinstance(model, LanguageModel):
            # the same budget as the teacher's continuation (which may have stopped at the limit)
            options = DecodeOptions(gamma=gamma, max_new_tokens=ex.tokens.shape[0] - ex.prompt_length)
            result = decode_tokens(model, prompt, adapted=adapted, options=options)
        else:
            hidden = ex.encoder_states.to(model.model.dtype)
            result = decode_window(model, hidden, prompt, adapted=adapted, options=DecodeOptions(gamma=gamma))
            eot = special_id(model, "<|endoftext|>")
            hypotheses[ex.utterance] = model.tokenizer.decode([t for t in result.tokens if t < eot]).strip()
        tokens += len(result.tokens)
        calls += result.forward_calls
        mismatches += result.tokens != ex.tokens[ex.prompt_length :].tolist()
    figures = {"gamma": gamma, "tokens_per_forward": tokens / calls, "mismatches": mismatches, "utterances": len(examples)}
    if references and hypotheses:
        scored = [u for u in hypotheses if u in references]
        figures["wer"] = word_error_rate([references[u] for u in scored], [hypotheses[u] for u in scored])
    return figures

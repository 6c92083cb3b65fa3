"""Training the predictive stream: LoRA denoising distillation (Algorithm 3, DESIGN §1.4).

Self-distillation: the frozen base model transcribes the training audio greedily (no human
transcripts); the teacher is the control stream on those tokens. The student (adapter on)
reads the block it will read at inference — the last committed token x_c and γ noisy drafts,
attending to the *control stream's* keys/values of the prefix (as `dual_stream.HFDualStream`
does), causally at x_c and bidirectionally among the drafts — and is trained with

    s_T = 0 ;  s_t = (s_{t+1} + 1) · 1[argmax q_{t+1} = x_{t+1}]
    L   = − Σ_t (s_t + 1) · p_tᵀ log q_t  /  Σ_t (s_t + 1)

The drafts come from a per-utterance replay buffer of the student's own past argmax
predictions (what inference feeds it), plus random replacement and placeholder tails.

One step on one utterance costs one teacher pass (no grad; its self-attention keys/values
are the prefix of every cut, and its cross-attention keys/values are shared by all rows) and
one student pass over `cuts` blocks of γ+1 tokens. Encoder outputs and transcripts are
computed once (`prepare_examples`) and cached on disk: this is what makes CPU training practical.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from .audio import load_audio
from .decoding import DecodeOptions
from .dual_stream import project
from .whisper import (
    AdaptedModel,
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
    seed: int = 0
    checkpoint_every: int = 200  # steps between checkpoints (resume point)


@dataclass
class Example:
    utterance: str  # utterance id
    encoder_states: torch.Tensor  # [1, frames, d_model], float16 to halve memory
    tokens: torch.Tensor  # [L] prompt + greedy transcript + end-of-text (the base model's own)
    prompt_length: int


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
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    def repeat(cache):
        return DynamicCache(
            [(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)) for layer in cache.layers]
        )

    return EncoderDecoderCache(repeat(teacher_cache.self_attention_cache), repeat(teacher_cache.cross_attention_cache))


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
    """Per utterance, the student's latest argmax prediction for every position (its drafts)."""

    def __init__(self, examples: Sequence[Example], gamma: int, vocab: int, placeholder: int, generator):
        self.predictions = {}
        for ex in examples:
            # start from the truth corrupted at 50 %: early drafts are poor, as they are at inference
            noisy = ex.tokens.clone()
            flip = torch.rand(noisy.shape, generator=generator) < 0.5
            noisy[flip] = torch.randint(vocab, (int(flip.sum()),), generator=generator)
            self.predictions[ex.utterance] = torch.cat([noisy, torch.full((gamma + 1,), placeholder)])

    def drafts(self, ex: Example, cuts: torch.Tensor, gamma: int) -> torch.Tensor:
        index = cuts.view(-1, 1) + torch.arange(1, gamma + 1).view(1, -1)
        return self.predictions[ex.utterance][index]

    def update(self, ex: Example, cuts: torch.Tensor, argmax: torch.Tensor) -> None:
        index = cuts.view(-1, 1) + torch.arange(1, argmax.shape[1] + 1).view(1, -1)
        self.predictions[ex.utterance][index] = argmax


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


def distillation_step(
    bundle: WhisperBundle,
    adapted: AdaptedModel,
    example: Example,
    replay: ReplayBuffer,
    config: TrainingConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict]:
    """Loss of one utterance (backward not called) and statistics."""
    gamma, rows = config.gamma, config.cuts_per_utterance
    placeholder = special_id(bundle, "<|endoftext|>")
    vocab = bundle.model.config.vocab_size
    L = example.tokens.shape[0]
    teacher, cache = _teacher_pass(bundle, example)

    # x_c = tokens[cut]: the last committed token; at least one target must follow it
    low, high = example.prompt_length - 1, L - 2
    cuts = torch.randint(low, high + 1, (rows,), generator=generator)
    drafts = replay.drafts(example, cuts, gamma)
    replace = torch.rand(drafts.shape, generator=generator) < config.replace_prob
    drafts = torch.where(replace, torch.randint(vocab, drafts.shape, generator=generator), drafts)
    tail_start = torch.randint(1, gamma + 1, (rows, 1), generator=generator)
    with_tail = torch.rand((rows, 1), generator=generator) < config.placeholder_prob
    tail = with_tail & (torch.arange(gamma).view(1, -1) >= tail_start)
    draft_positions = cuts.view(-1, 1) + torch.arange(1, gamma + 1).view(1, -1)
    drafts = torch.where(tail | (draft_positions >= L), torch.full_like(drafts, placeholder), drafts)

    log_q = student_logits(adapted, example, cuts, drafts, cache).log_softmax(-1)  # [rows, γ+1, V]
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
    cross_entropy = -(p * log_q).sum(-1)  # [rows, γ+1]
    loss = (weights * cross_entropy).sum() / weights.sum()
    replay.update(example, cuts, argmax[:, :gamma])
    # drafts accepted in a row from slot 1 on if this block were verified: a live τ proxy
    run = (hits.long().cumprod(-1)).sum(-1).float()
    return loss, {"hits": hits.sum().item() / max(valid.sum().item(), 1), "run": run.mean().item()}


def train(
    bundle: WhisperBundle,
    examples: Sequence[Example],
    config: TrainingConfig,
    *,
    output_dir: Path,
    resume: bool = True,
) -> AdaptedModel:
    """Train a LoRA adapter with checkpoints in output_dir/checkpoint (resumed when present)."""
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    adapted = new_adapter(bundle, rank=config.rank, seed=config.seed)
    model = adapted.peft_model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup * config.steps), config.steps)
    placeholder = special_id(bundle, "<|endoftext|>")
    replay = ReplayBuffer(examples, config.gamma, bundle.model.config.vocab_size, placeholder, generator)
    checkpoint = output_dir / "checkpoint"
    step = 0
    if resume and (checkpoint / "state.pt").exists():
        state = torch.load(checkpoint / "state.pt", weights_only=False)
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        replay.predictions = state["replay"]
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
            loss, info = distillation_step(bundle, adapted, example, replay, config, generator)
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
    bundle: WhisperBundle,
    adapted: AdaptedModel,
    examples: Sequence[Example],
    gamma: int,
    references: Optional[dict[str, str]] = None,
) -> dict:
    """Lossless greedy decode of every example: tokens per forward, mismatches vs the teacher and,
    given human transcripts per utterance id, the WER of the decoded text."""
    from .metrics import word_error_rate

    tokens = calls = mismatches = 0
    eot = special_id(bundle, "<|endoftext|>")
    hypotheses = {}
    for ex in examples:
        prompt = ex.tokens[: ex.prompt_length].tolist()
        hidden = ex.encoder_states.to(bundle.model.dtype)
        result = decode_window(bundle, hidden, prompt, adapted=adapted, options=DecodeOptions(gamma=gamma))
        tokens += len(result.tokens)
        calls += result.forward_calls
        mismatches += result.tokens != ex.tokens[ex.prompt_length :].tolist()
        hypotheses[ex.utterance] = bundle.tokenizer.decode([t for t in result.tokens if t < eot]).strip()
    figures = {"gamma": gamma, "tokens_per_forward": tokens / calls, "mismatches": mismatches, "utterances": len(examples)}
    if references:
        scored = [u for u in hypotheses if u in references]
        figures["wer"] = word_error_rate([references[u] for u in scored], [hypotheses[u] for u in scored])
    return figures

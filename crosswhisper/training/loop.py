"""The distillation loop: one step's loss (`distillation_step`), the run with checkpoints and
resumption (`train`, on one process or data-parallel on several: `distributed.py`), and warm
starts from a saved adapter."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tqdm import tqdm

from ..lm import LanguageModel
from ..lora import AdaptedModel, check_adapter_record
from ..whisper import WhisperBundle
from .config import TrainingConfig
from .data import Example, ReplayBuffer, _previous_block_drafts
from .distributed import Processes, rank_seed
from .tasks import DistillationTask, as_task

logger = logging.getLogger(__name__)


def suffix_weights(hits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(s_t + 1) with s_T = 0, s_t = (s_{t+1} + 1)·hit_{t+1}: a position is worth more when the
    predictions after it are right, because getting it right unlocks that whole run."""
    s = torch.zeros_like(hits, dtype=torch.float32)
    for t in range(hits.shape[1] - 2, -1, -1):
        s[:, t] = (s[:, t + 1] + 1) * hits[:, t + 1]
    return (s + 1) * valid


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


def _warm_start(task: DistillationTask, adapted: AdaptedModel, directory: Path) -> None:
    """Copy a saved adapter's weights into the fresh one (same modules, same base). A saved
    adapter of a lower rank fills the first ranks (`_grow_rank`): the same function to start with."""
    from peft import load_peft_weights, set_peft_model_state_dict

    check_adapter_record(directory, task.base)
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
    processes: Optional[object] = None,
) -> AdaptedModel:
    """Train a LoRA adapter with checkpoints in output_dir/checkpoint (resumed when present).

    `processes`: a `distributed.Processes` or an accelerate `Accelerator`; by default one
    process, or the launched ones when WORLD_SIZE > 1 (`accelerate launch`, torchrun). Several
    processes train data-parallel: each draws its own utterances (its generator is seeded
    from config.seed and its rank; rank 0 draws as a single process would), the gradients are
    averaged before clipping (one optimizer step sees processes × utterances_per_step
    utterances), the main process writes the checkpoints (every rank's generator and replay
    buffer in it), and a resume needs the same number of processes."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import get_cosine_schedule_with_warmup

    task = as_task(task)
    processes = Processes.from_environment(processes)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    generator = torch.Generator().manual_seed(rank_seed(config.seed, processes.rank))
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
        stored = {k: v for k, v in state.get("config", {}).items() if k not in ("steps", "checkpoint_every")}
        wanted = {k: v for k, v in asdict(config).items() if k not in ("steps", "checkpoint_every") and k in stored}
        if stored != wanted:
            raise ValueError(f"{checkpoint} holds a run with another configuration ({stored}); use another output_dir")
        saved_processes = state.get("processes", 1)
        if saved_processes != processes.count:
            raise ValueError(
                f"{checkpoint} holds a run of {saved_processes} process(es), this one has {processes.count}: "
                "resume it with as many processes (each one's draws are in it), or use another output_dir"
            )

        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        own = state["ranks"][processes.rank] if processes.count > 1 else state
        replay.predictions = own["replay"]
        replay.alternatives = own.get("replay_alternatives", replay.alternatives)
        generator.set_state(own["generator"])
        step = state["step"]
        if processes.is_main:
            logger.info("resumed from step %d", step)

    order = list(range(len(examples)))
    started = time.perf_counter()
    progress = tqdm(total=config.steps, initial=step, desc="distillation", unit="step", disable=not processes.is_main)
    while step < config.steps:
        optimizer.zero_grad(set_to_none=True)
        stats = []
        for _ in range(config.utterances_per_step):
            example = examples[order[int(torch.randint(len(order), (1,), generator=generator))]]
            loss, info = distillation_step(task, adapted, example, replay, config, generator)
            (loss / config.utterances_per_step).backward()
            stats.append((loss.item(), info["hits"], info["run"]))
        processes.mean_gradients(params)
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
            own = {"replay": replay.predictions, "replay_alternatives": replay.alternatives, "generator": generator.get_state()}
            ranks = processes.gather(own)  # every process's draws (all of them take part)
            processes.check_identical(params)
            if processes.is_main:
                checkpoint.mkdir(parents=True, exist_ok=True)
                state = {
                    "adapter": get_peft_model_state_dict(model),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    **(own if processes.count == 1 else {"ranks": ranks}),  # rank r resumes from ranks[r]
                    "step": step,
                    "config": asdict(config),
                    "processes": processes.count,
                }
                torch.save(state, checkpoint / "state.partial")
                (checkpoint / "state.partial").replace(checkpoint / "state.pt")
    progress.close()
    model.eval()
    if processes.is_main:
        logger.info("trained %d steps in %.0f s (this run)", config.steps, time.perf_counter() - started)
    return adapted

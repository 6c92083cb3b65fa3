"""What Whisper and text LMs do alike around the core loop (`decoding.decode`): the default
number of draft slots for a device, the sampler's seeding, and transformers' `generate` as the
reference decode (configured the same way, its decoder forward calls counted)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from .decoding import DecodeOptions, DecodeResult, DualStreamModel, decode_batch


def default_gamma(table: Mapping[str, int], device) -> int:
    """γ for a device from a family's table ({"cpu": ..., "cuda": ...}); other accelerators
    take the GPU value (a call costs about the same for more tokens there)."""
    return table.get(torch.device(device).type, table["cuda"])


def decode_prompt(
    prompt: Sequence[int],
    *,
    streams: Callable[[bool], DualStreamModel],
    drafting_possible: bool,
    options: DecodeOptions,
    eos_token_id: Union[int, Sequence[int]],
    placeholder_id: int,
    generator: Optional[torch.Generator],
    device,
) -> DecodeResult:
    """Our loop after `prompt`: cross-regressive where an adapter can draft (γ ≥ 1), else plain
    autoregressive, for at most the positions the model has left. `streams(drafting)` builds the
    model's two streams (the control stream alone when not drafting)."""
    return decode_prompts(
        [prompt], streams=streams, drafting_possible=drafting_possible, options=options,
        eos_token_id=eos_token_id, placeholder_id=placeholder_id, generator=generator, device=device,
    )[0]


def decode_prompts(
    prompts: Sequence[Sequence[int]],
    *,
    streams: Callable[[bool], DualStreamModel],
    drafting_possible: bool,
    options: DecodeOptions,
    eos_token_id: Union[int, Sequence[int]],
    placeholder_id: int,
    generator: Optional[torch.Generator],
    device,
) -> list[DecodeResult]:
    """`decode_prompt` for a batch: one sequence per prompt, decoded together (`decode_batch`);
    `streams(drafting)` builds the model over all of them. Each row is capped by the positions
    its own prompt leaves."""
    drafting = drafting_possible and options.gamma > 0
    return decode_batch(
        streams(drafting),
        prompts,
        options=dataclasses.replace(options, gamma=options.gamma if drafting else 0),
        eos_token_id=eos_token_id,
        placeholder_id=placeholder_id,
        generator=generator,
        device=device,
    )


def sampling_generator(temperature: float, seed: Optional[int], device, *, reference: bool) -> Optional[torch.Generator]:
    """The generator our loop samples from (None when greedy). transformers' `generate` (the
    reference path) samples from the global generator, so a seed also seeds that one."""
    if temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    if reference and seed is not None:
        torch.manual_seed(seed)
    return generator


def reference_generation_config(config, *, temperature: float, **overrides):
    """A copy of a model's generation config for a plain reference decode: greedy, or ancestral
    sampling at `temperature` (no beams, no top-k/top-p); `overrides` set further fields.
    A copy, because `generate()` edits the config it is given."""
    config = copy.deepcopy(config)
    config.do_sample = temperature > 0
    config.temperature = temperature if temperature > 0 else None
    config.top_k, config.top_p, config.num_beams = None, None, 1
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


class ForwardCounter:
    """Counts a module's forward calls (`generate()` hides its loop). A context manager."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1

    def __enter__(self) -> "ForwardCounter":
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

"""Adapters of the predictive stream, for any model family (DESIGN §1.3).

One home for what Whisper and text LMs do alike with their LoRA adapters: the peft config
(from a family's `LoraRecipe`), a fresh adapter, saving and loading in peft's standard format
with a record of the base weights it was made for, and finding the adapter shipped in the
package for a model's weights. A loaded model of any family plugs in through `BaseWeights`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Protocol, Union

import torch
from torch import nn

from .dual_stream import StreamGate

logger = logging.getLogger(__name__)

ADAPTER_INFO_FILE = "crosswhisper_adapter.json"  # beside peft's files: which base weights it was made for
SHIPPED_ADAPTERS = Path(__file__).resolve().parent / "adapters"  # trained adapters, one directory per model


@dataclass(frozen=True)
class LoraRecipe:
    """Which layers a model family adapts, and how big the adapter is by default."""

    target_modules: Union[str, tuple[str, ...]]  # peft's target_modules (a regex or "all-linear")
    rank: int  # default LoRA rank
    task_type: Optional[str] = None  # peft task type ("CAUSAL_LM" for text LMs)

    def config(self, rank: Optional[int] = None, alpha: Optional[int] = None, *, random_init: bool = False):
        """peft LoraConfig; `random_init` gives a non-zero (untrained) delta."""
        from peft import LoraConfig

        rank = rank or self.rank
        return LoraConfig(
            r=rank,
            lora_alpha=alpha or rank,
            lora_dropout=0.0,
            target_modules=self.target_modules,
            task_type=self.task_type,
            # peft's default makes B = 0 (the adapter starts as a no-op); a random delta is the
            # worst case for drafting and the honest test of exactness
            init_lora_weights=not random_init,
        )


class BaseWeights(Protocol):
    """A loaded base model of any family (`WhisperBundle`, `lm.LanguageModel`)."""

    name: str  # what it was loaded as
    model: nn.Module  # the transformers model
    weights_sha256: Optional[str]  # fingerprint of the weights: adapters are matched by it

    @property
    def lora_recipe(self) -> LoraRecipe: ...


@dataclass(frozen=True, eq=False)
class AdaptedModel:
    """A base model with a LoRA adapter and the per-row stream gate (Whisper or a text LM)."""

    peft_model: nn.Module  # peft PeftModel over a private copy of the base model
    gate: StreamGate  # switches the adapter per row (control off, predictive on)
    source: str  # adapter directory ("<new>" for a fresh one)


AdapterArgument = Union[None, str, os.PathLike, AdaptedModel]  # what `transcribe`/`generate` take


def new_adapter(base: BaseWeights, *, rank: Optional[int] = None, random_init: bool = False, seed: int = 0) -> AdaptedModel:
    """A fresh LoRA adapter on a private copy of the base model (training, exactness tests)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base.model), base.lora_recipe.config(rank, random_init=random_init))
    peft_model.eval()
    return AdaptedModel(peft_model=peft_model, gate=StreamGate(peft_model), source="<new>")


def save_adapter(
    adapted: AdaptedModel, directory: Union[str, os.PathLike], base: BaseWeights, *,
    dtype: torch.dtype = torch.float16, **card,
) -> None:
    """peft format plus a record of the base weights it belongs to (and `card`'s entries).

    Weights are stored as `dtype`: float16 by default, half the size, and the adapter only
    drafts (exactness never depends on its values). float32 keeps a saved adapter bit-identical
    to the one in memory."""
    from peft import get_peft_model_state_dict

    directory = Path(directory)
    peft_model = adapted.peft_model
    state = {key: value.to(dtype) for key, value in get_peft_model_state_dict(peft_model).items()}
    peft_model.save_pretrained(str(directory), state_dict=state)
    info = {"base_model": base.name, "base_weights_sha256": base.weights_sha256,
            "vocab_size": base.model.config.vocab_size, **card}
    (directory / ADAPTER_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def check_adapter_record(directory: Path, base: BaseWeights) -> None:
    """Refuse a directory that is no peft adapter, or whose record names other base weights."""
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(f"not a peft adapter directory (no adapter_config.json): {directory}")
    info_path = directory / ADAPTER_INFO_FILE
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        want, have = info.get("base_weights_sha256"), base.weights_sha256
        if info.get("vocab_size") not in (None, base.model.config.vocab_size) or (want and have and want != have):
            raise ValueError(
                f"adapter {directory} was made for base model {info.get('base_model')!r} "
                f"(weights {str(want)[:12]}), not for {base.name!r} (weights {str(have)[:12]})"
            )


def load_adapter(base: BaseWeights, adapter: Union[str, os.PathLike, AdaptedModel]) -> AdaptedModel:
    """Load a peft adapter directory onto a private copy of `base.model` (gated, fused for
    inference), refusing one whose record names other base weights or another vocabulary."""
    from peft import PeftModel

    if isinstance(adapter, AdaptedModel):
        return adapter
    directory = Path(adapter)
    check_adapter_record(directory, base)
    try:
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(directory))
    except (RuntimeError, ValueError, KeyError) as error:  # shapes or module names of another model
        raise ValueError(f"adapter {directory} does not fit {base.name!r}: {error}") from None
    peft_model.eval()
    gate = StreamGate(peft_model)
    gate.fuse(peft_model)  # inference only: lean gated layers instead of peft's
    return AdaptedModel(peft_model=peft_model, gate=gate, source=str(directory))


def shipped_adapter(model_name: str) -> Optional[Path]:
    """The adapter shipped in the package under a bundled model's name, or None."""
    directory = SHIPPED_ADAPTERS / model_name
    return directory if (directory / "adapter_config.json").is_file() else None


def shipped_adapter_for(base: BaseWeights) -> Optional[Path]:
    """The shipped adapter made for exactly these base weights (by checksum), whatever the
    model was called when loaded (bundled name, CTranslate2 directory, ...); None if none."""
    if not base.weights_sha256:
        return None
    # read SHIPPED_ADAPTERS at call time: tests point it at another directory
    for info in sorted(Path(SHIPPED_ADAPTERS).glob(f"*/{ADAPTER_INFO_FILE}")):
        if json.loads(info.read_text()).get("base_weights_sha256") == base.weights_sha256:
            return info.parent
    return None


@lru_cache(maxsize=4)
def _cached_adapter(base: BaseWeights, directory: str) -> AdaptedModel:
    # transcribe()/generate() are called in loops over files and prompts: load a directory once
    return load_adapter(base, directory)


def resolve_adapter(base: BaseWeights, adapter: AdapterArgument) -> Optional[AdaptedModel]:
    """A user's adapter argument → a loaded adapter, or None (no drafting).

    "auto" is the shipped adapter for these weights (None if none ships); a directory is loaded
    once per process (and refused if it was made for other base weights); an `AdaptedModel` or
    None is returned as is."""
    if adapter is None or isinstance(adapter, AdaptedModel):
        return adapter
    if isinstance(adapter, str) and adapter == "auto":
        directory = shipped_adapter_for(base)
        if directory is None:
            logger.debug("no adapter ships for %s: decoding without drafts", base.name)
            return None
        adapter = directory
    return _cached_adapter(base, str(adapter))

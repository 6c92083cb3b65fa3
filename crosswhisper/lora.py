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

from .dual_stream import StreamGate, lora_factors

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
    # optional `weights`: the same weights under transformers' module names without
    # transformers' model (Whisper's `whisper.model.Whisper`): adapters load onto it as factors

    @property
    def lora_recipe(self) -> LoraRecipe: ...


class AdaptedModel:
    """A base model with a LoRA adapter (Whisper or a text LM), in one or both of two forms:

    - `factors`: each adapted linear layer's LoRA factors read straight from the adapter's file
      (no peft, no copy of the base model): what `whisper.streams` drafts with;
    - `peft_model` + `gate`: peft's model over a private copy of the base model, with the
      per-row stream gate (training, `HFDualStream`, text LMs); made on first use when the
      adapter was loaded as factors (importing peft and copying the model take ~2.5 s)."""

    def __init__(
        self, *, source: str, peft_model: Optional[nn.Module] = None, gate: Optional[StreamGate] = None,
        factors: Optional["LoraFactors"] = None, make_peft=None,
    ):
        if peft_model is None and make_peft is None:
            raise ValueError("an AdaptedModel needs a peft model or a way to make one")
        self.source = source  # adapter directory ("<new>" for a fresh one)
        self.factors = factors  # None: read the LoRA layers of `peft_model`
        self._peft = (peft_model, gate) if peft_model is not None else None
        self._make_peft = make_peft

    def _made(self) -> tuple[nn.Module, StreamGate]:
        if self._peft is None:
            self._peft = self._make_peft()
        return self._peft

    @property
    def peft_model(self) -> nn.Module:
        """peft PeftModel over a private copy of the base model."""
        return self._made()[0]

    @property
    def gate(self) -> StreamGate:
        """Switches the adapter per row of `peft_model` (control off, predictive on)."""
        return self._made()[1]


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (caches are keyed by it)
class LoraFactors:
    """An adapter's LoRA factors by module name (transformers' names, e.g.
    "model.decoder.layers.0.self_attn.q_proj"): (Aᵀ [in, rank], s·Bᵀ [rank, out]) in float32,
    s the LoRA scaling, as `dual_stream.GatedLoRALinear` holds them."""

    by_module: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def under(self, prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The factors of the modules below `prefix` ("model.decoder."), named relative to it."""
        return {name[len(prefix):]: pair for name, pair in self.by_module.items() if name.startswith(prefix)}


AdapterArgument = Union[None, str, os.PathLike, AdaptedModel]  # what `transcribe`/`generate` take


def new_adapter(base: BaseWeights, *, rank: Optional[int] = None, random_init: bool = False, seed: int = 0) -> AdaptedModel:
    """A fresh LoRA adapter on a private copy of the base model (training, exactness tests)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base.model), base.lora_recipe.config(rank, random_init=random_init))
    peft_model.eval()
    return AdaptedModel(peft_model=peft_model, gate=StreamGate(peft_model), source="<new>")


def _named_modules(base: BaseWeights) -> nn.Module:
    """The module tree adapters name: the lean `weights` where the family has them (loading an
    adapter then needs neither transformers' model nor peft), else the transformers model."""
    weights = getattr(base, "weights", None)
    return base.model if weights is None else weights


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
        if info.get("vocab_size") not in (None, _named_modules(base).config.vocab_size) or (want and have and want != have):
            raise ValueError(
                f"adapter {directory} was made for base model {info.get('base_model')!r} "
                f"(weights {str(want)[:12]}), not for {base.name!r} (weights {str(have)[:12]})"
            )


def load_adapter(base: BaseWeights, adapter: Union[str, os.PathLike, AdaptedModel]) -> AdaptedModel:
    """Load a peft adapter directory for `base`, refusing one whose record names other base
    weights or another vocabulary, or whose layers do not fit the model. Where the family has
    lean `weights` (Whisper), the adapter is read as `LoraFactors` and peft's model is made only
    if asked for; else onto a private copy of `base.model` (gated, fused for inference)."""
    if isinstance(adapter, AdaptedModel):
        return adapter
    directory = Path(adapter)
    check_adapter_record(directory, base)

    def make_peft() -> tuple[nn.Module, StreamGate]:
        from peft import PeftModel

        try:
            peft_model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(directory))
        except (RuntimeError, ValueError, KeyError) as error:  # shapes or module names of another model
            raise ValueError(f"adapter {directory} does not fit {base.name!r}: {error}") from None
        peft_model.eval()
        gate = StreamGate(peft_model)
        gate.fuse(peft_model)  # inference only: lean gated layers instead of peft's
        return peft_model, gate

    if getattr(base, "weights", None) is None:
        peft_model, gate = make_peft()
        return AdaptedModel(peft_model=peft_model, gate=gate, source=str(directory))
    factors = read_lora_factors(directory, base.weights)
    return AdaptedModel(factors=factors, make_peft=make_peft, source=str(directory))


# peft's file names and the one kind of adapter read without peft (plain LoRA on linear layers)
_PEFT_WEIGHTS = "adapter_model.safetensors"
_PLAIN_LORA_OPTIONS = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none"}


def read_lora_factors(directory: Path, modules: nn.Module) -> LoraFactors:
    """peft's adapter file → `LoraFactors` of `modules` (whose linear layers it must fit), with
    peft's arithmetic: A and B upcast to the layer's dtype, B scaled by lora_alpha / r."""
    from safetensors.torch import load_file

    config = json.loads((directory / "adapter_config.json").read_text())
    unusual = {key: config.get(key) for key, plain in _PLAIN_LORA_OPTIONS.items() if config.get(key, plain) != plain}
    if config.get("peft_type", "LORA") != "LORA" or unusual or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"adapter {directory}: only plain LoRA adapters are supported ({unusual or config.get('peft_type')})")
    if not (directory / _PEFT_WEIGHTS).is_file():
        raise FileNotFoundError(f"adapter {directory} has no {_PEFT_WEIGHTS}")
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(str(directory / _PEFT_WEIGHTS))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        head, _, factor = key.removesuffix(".weight").rpartition(".")
        if factor not in ("lora_A", "lora_B"):
            raise ValueError(f"adapter {directory}: unexpected tensor {key}")
        pairs.setdefault(head.removeprefix("base_model.model."), {})[factor] = tensor
    by_module = {}
    for name, pair in pairs.items():
        try:
            layer = modules.get_submodule(name)
        except AttributeError:
            layer = None
        a, b = pair.get("lora_A"), pair.get("lora_B")
        if (not isinstance(layer, nn.Linear) or a is None or b is None
                or a.shape[1] != layer.in_features or b.shape[0] != layer.out_features or a.shape[0] != b.shape[1]):
            raise ValueError(f"adapter {directory} does not fit this model: no linear layer {name} of its shape")
        # float32 as peft holds them, B·s in float32 before any cast: `StreamGate.fuse`'s arithmetic
        by_module[name] = lora_factors(a.float(), b.float() * scaling, layer.weight)
    return LoraFactors(by_module)


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

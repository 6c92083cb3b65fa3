"""CTranslate2 (faster-whisper) Whisper directories → transformers `WhisperForConditionalGeneration`.

A CTranslate2 `model.bin` is a simple binary (version, spec name, revision, then named tensors,
then aliases). The conversion is exact: float16 weights are upcast to float32 without rounding,
so the model computes what faster-whisper computes with `compute_type="float32"`. q/k/v are
fused in `linear_0`, the cross-attention's k/v in `linear_1`. The tokenizer and generation config
come from the directory's tokenizer.json and config.json (special ids differ between `.en` and
multilingual vocabularies: they are read, never hard-coded).
"""

from __future__ import annotations

import json
import logging
import mmap
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:  # (imported where used: transformers' Whisper model takes ~2 s to import)
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

logger = logging.getLogger(__name__)

# Bump when the conversion output changes, so that stale cache entries are not reused.
CONVERTER_VERSION = 1

CT2_REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")
CT2_AUX_FILES = ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json")

# openai-whisper and CTranslate2 call a model multilingual when its vocabulary has at least this
# many tokens: the multilingual BPE has one more regular token than GPT-2's English one.
_MULTILINGUAL_MIN_VOCAB = 51865


class WhisperParts(NamedTuple):
    model: WhisperForConditionalGeneration
    tokenizer: WhisperTokenizerFast
    generation_config: GenerationConfig
    feature_extractor: WhisperFeatureExtractor


def check_ct2_dir(directory: Path) -> None:
    missing = [f for f in CT2_REQUIRED_FILES if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: CTranslate2 Whisper directory lacks {', '.join(missing)}")


# CTranslate2's DataType enum (include/ctranslate2/types.h, specs/model_spec.py _dtype_to_type_id).
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
# Pre-v4 files stored an item size instead of a dtype id (CTranslate2's get_dtype_from_item_size).
_CT2_ITEM_SIZE_DTYPES = {4: np.float32, 2: np.int16, 1: np.int8}
_CT2_MAX_BINARY_VERSION = 6
# CTranslate2's Activation enum (specs/common_spec.py) -> transformers activation names.
_CT2_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu"}


class _Ct2File(NamedTuple):
    spec: str  # e.g. "WhisperSpec"
    revision: int  # the spec's weight-layout revision
    variables: dict[str, np.ndarray]  # name -> array viewing the file (bfloat16 as raw uint16)
    aliases: dict[str, str]  # alias name -> name of the variable holding the data
    bfloat16: frozenset[str]  # names of the variables stored as bfloat16


def _read_ct2_model_bin(path: Path) -> _Ct2File:
    """Parse a CTranslate2 model.bin.

    Layout (little-endian, see ctranslate2/specs/model_spec.py `_serialize`):
      u32 binary version; [v>=2] string spec name, u32 spec revision; u32 variable count;
      per variable: string name, u8 rank, u32 dims[rank], [v>=4] u8 dtype id + u32 byte count
      ([v<4] u8 item size + u32 element count), raw bytes; [v>=3] u32 alias count, then
      (alias, target) string pairs. A string is u16 length (with the NUL), bytes, NUL.
    Arrays are views of a copy-on-write memory map, so nothing is copied here.
    """
    with open(path, "rb") as handle:
        buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    offset = 0

    def take(fmt: str):
        nonlocal offset
        values = struct.unpack_from("<" + fmt, buffer, offset)
        offset += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def take_string() -> str:
        nonlocal offset
        length = take("H")
        raw = bytes(buffer[offset : offset + length])
        offset += length
        if not raw.endswith(b"\0"):
            raise ValueError(f"{path}: corrupt string at byte {offset - length}")
        return raw[:-1].decode("utf-8")

    try:
        version = take("I")
        if not 1 <= version <= _CT2_MAX_BINARY_VERSION:
            raise ValueError(f"{path}: unsupported CTranslate2 binary version {version}")
        spec, revision = (take_string(), take("I")) if version >= 2 else ("", 1)
        variables: dict[str, np.ndarray] = {}
        bfloat16 = set()
        for _ in range(take("I")):
            name = take_string()
            shape = tuple(take("I") for _ in range(take("B")))
            if version >= 4:
                dtype_id, num_bytes = take("B"), take("I")
                if dtype_id not in _CT2_DTYPES:
                    raise ValueError(f"{path}: {name} has unknown dtype id {dtype_id}")
                dtype = _CT2_DTYPES[dtype_id]
            else:
                item_size, count = take("B"), take("I")
                dtype, num_bytes = _CT2_ITEM_SIZE_DTYPES[item_size], item_size * count
            if offset + num_bytes > len(buffer):
                raise struct.error(f"{name} needs {num_bytes} bytes, {len(buffer) - offset} left")
            if dtype == "bfloat16":  # numpy has no bfloat16: keep the raw bits, torch reads them
                dtype = np.uint16
                bfloat16.add(name)
            count = num_bytes // np.dtype(dtype).itemsize
            variables[name] = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)
            offset += num_bytes
        aliases = {}
        if version >= 3:
            for _ in range(take("I")):
                alias = take_string()
                aliases[alias] = take_string()
    except struct.error as error:
        raise ValueError(f"{path}: truncated CTranslate2 model.bin ({error})") from error
    if offset != len(buffer):
        raise ValueError(f"{path}: {len(buffer) - offset} unexpected trailing bytes")
    return _Ct2File(spec, revision, variables, aliases, frozenset(bfloat16))


class _Ct2Weights:
    """The variables of a model.bin, handed out once each as float32 tensors."""

    def __init__(self, ct2_file: _Ct2File):
        self.variables = ct2_file.variables
        self.aliases = ct2_file.aliases
        self.bfloat16 = ct2_file.bfloat16
        self.unused = set(self.variables) | set(self.aliases)

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.variables

    def names(self) -> list[str]:
        return sorted(set(self.variables) | set(self.aliases))

    def consume(self, name: str) -> None:
        """Mark a variable as used without reading it (e.g. an alias of one already read)."""
        self.unused.discard(name)
        self.unused.discard(self.aliases.get(name, name))

    def scalar(self, name: str) -> int:
        self.unused.discard(name)
        return int(self.variables[name].reshape(()))

    def tensor(self, name: str) -> torch.Tensor:
        """float32 copy of a variable (an alias resolves to its target; int8/int16 are dequantized)."""
        self.unused.discard(name)
        target = self.aliases.get(name, name)
        self.unused.discard(target)
        array = self.variables[target]
        # Always copy: the arrays view a memory map of model.bin. float16/bfloat16 -> float32 is exact.
        if target in self.bfloat16:
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).to(torch.float32)
        if array.dtype in (np.float16, np.float32):
            return torch.from_numpy(array).to(torch.float32, copy=True)
        # Quantized weight: CTranslate2 stored round(w * scale) with a per-row (int8) or global (int16) scale.
        scale_name = f"{target}_scale"
        if scale_name not in self.variables:
            raise ValueError(f"integer variable {name} has no {scale_name}")
        self.unused.discard(scale_name)
        self.unused.discard(f"{name}_scale")
        scale = torch.from_numpy(self.variables[scale_name]).float()
        values = torch.from_numpy(array).float()
        if scale.ndim == 1:
            scale = scale.reshape(-1, *([1] * (values.ndim - 1)))
        return values / scale


def _layer_count(names: list[str], prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
    indices = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    if indices != set(range(len(indices))):
        raise ValueError(f"{prefix} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def convert_ct2(ct2_dir: Path) -> WhisperParts:
    """Convert a CTranslate2 Whisper directory to transformers objects (float32 weights).

    Tests spy on this function to check that the cache spares a second conversion.
    """
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    ct2_file = _read_ct2_model_bin(ct2_dir / "model.bin")
    if ct2_file.spec != "WhisperSpec":
        raise ValueError(f"{ct2_dir}: a CTranslate2 {ct2_file.spec or 'pre-v2'} model, not a Whisper model")
    if ct2_file.revision > 3:
        revision = ct2_file.revision
        logger.warning("%s: WhisperSpec revision %d is newer than the known 3", ct2_dir, revision)
    weights = _Ct2Weights(ct2_file)
    ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))

    config = _whisper_config_from_ct2(weights)
    state_dict = _state_dict_from_ct2(weights, config)
    leftover = _check_attributes(weights)
    if leftover:
        raise ValueError(f"{ct2_dir}: CTranslate2 variables the converter does not understand: {leftover}")

    tokenizer = _tokenizer_from_ct2(ct2_dir, config.vocab_size)
    eot = _token_id(tokenizer, "<|endoftext|>")
    sot = _token_id(tokenizer, "<|startoftranscript|>")
    config.bos_token_id = config.eos_token_id = config.pad_token_id = eot
    config.decoder_start_token_id = sot
    config.suppress_tokens = list(ct2_config.get("suppress_ids") or [])
    config.begin_suppress_tokens = list(ct2_config.get("suppress_ids_begin") or [])

    # Build on the meta device: random initialisation would be thrown away anyway.
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    _check_materialised(model)

    model.generation_config = build_generation_config(
        tokenizer,
        vocab_size=config.vocab_size,
        suppress_ids=config.suppress_tokens,
        suppress_ids_begin=config.begin_suppress_tokens,
        lang_ids=ct2_config.get("lang_ids"),
        alignment_heads=ct2_config.get("alignment_heads"),
        decoder_layers=config.decoder_layers,
        decoder_heads=config.decoder_attention_heads,
        max_target_positions=config.max_target_positions,
    )
    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=16_000)
    return WhisperParts(model.eval(), tokenizer, model.generation_config, feature_extractor)


def _whisper_config_from_ct2(weights: _Ct2Weights) -> WhisperConfig:
    from transformers import WhisperConfig

    names = weights.names()
    conv1 = weights.variables["encoder/conv1/weight"]  # [d_model, n_mels, 3]
    d_model, num_mel_bins = int(conv1.shape[0]), int(conv1.shape[1])

    def heads(prefix: str) -> int:
        # CTranslate2 stores num_heads as a scalar variable; very old files may not.
        if f"{prefix}/num_heads" in weights:
            return weights.scalar(f"{prefix}/num_heads")
        logger.warning("%s/num_heads not stored; assuming Whisper's 64-dim heads", prefix)
        return d_model // 64

    activation_id = weights.scalar("decoder/activation") if "decoder/activation" in weights else 3
    if activation_id not in _CT2_ACTIVATIONS:
        raise ValueError(f"unsupported CTranslate2 activation id {activation_id}")
    scale_embeddings = False
    if "decoder/scale_embeddings" in weights:
        scale_embeddings = weights.scalar("decoder/scale_embeddings") != 0

    projection = "decoder/projection/weight"
    tied = weights.aliases.get(projection) == "decoder/embeddings/weight" or (
        projection in weights.variables
        and np.array_equal(weights.variables[projection], weights.variables["decoder/embeddings/weight"])
    )
    return WhisperConfig(
        vocab_size=int(weights.variables["decoder/embeddings/weight"].shape[0]),
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=_layer_count(names, "encoder"),
        decoder_layers=_layer_count(names, "decoder"),
        encoder_attention_heads=heads("encoder"),
        decoder_attention_heads=heads("decoder"),
        encoder_ffn_dim=int(weights.variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(weights.variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(weights.variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(weights.variables["decoder/position_encodings/encodings"].shape[0]),
        activation_function=_CT2_ACTIVATIONS[activation_id],
        scale_embedding=scale_embeddings,
        tie_word_embeddings=tied,
    )


def _state_dict_from_ct2(weights: _Ct2Weights, config: WhisperConfig) -> dict[str, torch.Tensor]:
    d = config.d_model
    sd: dict[str, torch.Tensor] = {}

    def linear(hf: str, ct2: str) -> None:
        sd[f"{hf}.weight"] = weights.tensor(f"{ct2}/weight")
        sd[f"{hf}.bias"] = bias_or_zeros(ct2, sd[f"{hf}.weight"].shape[0])

    def bias_or_zeros(ct2: str, rows: int) -> torch.Tensor:
        # CTranslate2 omits a bias only when the source layer had none: that equals zeros.
        return weights.tensor(f"{ct2}/bias") if f"{ct2}/bias" in weights else torch.zeros(rows)

    def layer_norm(hf: str, ct2: str) -> None:
        sd[f"{hf}.weight"] = weights.tensor(f"{ct2}/gamma")
        sd[f"{hf}.bias"] = weights.tensor(f"{ct2}/beta")

    def attention_qkv(hf: str, ct2: str, names: tuple[str, ...]) -> None:
        # CTranslate2 fuses projections row-wise ([q; k; v] or [k; v]); transformers keeps them apart.
        weight = weights.tensor(f"{ct2}/weight")
        bias = bias_or_zeros(ct2, weight.shape[0])
        if weight.shape[0] != d * len(names):
            raise ValueError(f"{ct2}/weight has {weight.shape[0]} rows, expected {d * len(names)}")
        for i, proj in enumerate(names):
            sd[f"{hf}.{proj}.weight"] = weight[i * d : (i + 1) * d].clone()
            part = bias[i * d : (i + 1) * d]
            if proj == "k_proj":
                # Whisper's key projection has no bias. A key bias would add the same q.b to every
                # attention logit of a query, which softmax ignores, so dropping it is exact anyway.
                if part.abs().max() > 0:
                    logger.warning("%s: nonzero key bias dropped (softmax-invariant)", ct2)
            else:
                sd[f"{hf}.{proj}.bias"] = part.clone()

    def ffn_and_norms(hf: str, ct2: str) -> None:
        linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
        layer_norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
        layer_norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")

    # Encoder
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    sd["model.encoder.embed_positions.weight"] = weights.tensor("encoder/position_encodings/encodings")
    layer_norm("model.encoder.layer_norm", "encoder/layer_norm")
    for i in range(config.encoder_layers):
        hf, ct2 = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        attention_qkv(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
        ffn_and_norms(hf, ct2)

    # Decoder
    sd["model.decoder.embed_tokens.weight"] = weights.tensor("decoder/embeddings/weight")
    sd["model.decoder.embed_positions.weight"] = weights.tensor("decoder/position_encodings/encodings")
    layer_norm("model.decoder.layer_norm", "decoder/layer_norm")
    for i in range(config.decoder_layers):
        hf, ct2 = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        attention_qkv(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
        attention_qkv(f"{hf}.encoder_attn", f"{ct2}/attention/linear_0", ("q_proj",))
        attention_qkv(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ("k_proj", "v_proj"))
        linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
        layer_norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        ffn_and_norms(hf, ct2)

    # Output projection: usually an alias of the embeddings (tied), then one tensor serves both.
    if config.tie_word_embeddings:
        weights.consume("decoder/projection/weight")
        sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
    else:
        sd["proj_out.weight"] = weights.tensor("decoder/projection/weight")
    if "decoder/projection/bias" in weights and weights.tensor("decoder/projection/bias").abs().max() > 0:
        raise ValueError("the output projection has a bias, which transformers' Whisper cannot hold")
    return sd


# Scalar attributes CTranslate2 writes for Whisper, and the values this converter supports.
# num_heads, activation and scale_embeddings are read into the config; alignment_heads/_layer
# only configure CTranslate2's guided-alignment output and do not change the computation.
_CT2_FIXED_ATTRIBUTES = {
    "decoder/pre_norm": 1,
    "decoder/alibi": 0,
    "decoder/alibi_use_positive_positions": 0,
    "decoder/scale_alibi": 0,
    "decoder/start_from_zero_embedding": 0,
}
_CT2_IGNORED_ATTRIBUTES = ("decoder/alignment_heads", "decoder/alignment_layer")


def _check_attributes(weights: _Ct2Weights) -> list[str]:
    """Validate the remaining scalar attributes; return the names of variables nobody used."""
    for name, expected in _CT2_FIXED_ATTRIBUTES.items():
        if name in weights and weights.scalar(name) != expected:
            raise ValueError(f"unsupported CTranslate2 Whisper variant: {name} = {weights.scalar(name)}")
    for name in _CT2_IGNORED_ATTRIBUTES:
        weights.unused.discard(name)
    leftover = []
    for name in sorted(weights.unused):
        array = weights.variables.get(name)
        # Newer CTranslate2 releases add feature flags; a zero flag means the feature is off.
        if array is not None and array.ndim == 0 and int(array) == 0:
            logger.debug("ignoring CTranslate2 attribute %s = 0", name)
            continue
        leftover.append(name)
    return leftover


def _check_materialised(model: torch.nn.Module) -> None:
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"conversion left tensors without values: {meta}")


def _tokenizer_from_ct2(ct2_dir: Path, vocab_size: int) -> WhisperTokenizerFast:
    from transformers import WhisperTokenizerFast

    tokenizer_json = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    # Register the <|...|> control tokens as special, in id order: transformers' Whisper
    # tokenizer finds the first timestamp id as all_special_ids[-1] + 1.
    specials = [
        t["content"]
        for t in sorted(tokenizer_json.get("added_tokens", []), key=lambda t: t["id"])
        if t.get("special") and t["content"] != "<|endoftext|>"
    ]
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(ct2_dir / "tokenizer.json"),
        pad_token="<|endoftext|>",
        extra_special_tokens=specials,
    )
    _add_timestamp_tokens(tokenizer, ct2_dir, vocab_size)
    for token in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        _token_id(tokenizer, token)  # fail early on a tokenizer that is not Whisper's
    if tokenizer.all_special_ids[-1] != _token_id(tokenizer, "<|notimestamps|>"):
        raise ValueError(f"{ct2_dir}: <|notimestamps|> is not the last special token")
    return tokenizer


def _add_timestamp_tokens(tokenizer: WhisperTokenizerFast, ct2_dir: Path, vocab_size: int) -> None:
    """Append <|0.00|>..<|30.00|> from the CTranslate2 vocabulary so that every model id has a token."""
    start = len(tokenizer)
    if start >= vocab_size:
        return
    if (ct2_dir / "vocabulary.json").is_file():  # written by recent CTranslate2 converters
        vocabulary = json.loads((ct2_dir / "vocabulary.json").read_text(encoding="utf-8"))
    elif (ct2_dir / "vocabulary.txt").is_file():
        vocabulary = (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    else:
        return
    tokens = vocabulary[start:vocab_size]
    if len(tokens) != vocab_size - start or not all(re.fullmatch(r"<\|\d+\.\d\d\|>", t) for t in tokens):
        logger.debug("%s: ids %d.. are not timestamp tokens; tokenizer left as is", ct2_dir, start)
        return
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in tokens])
    if len(tokenizer) != vocab_size:
        raise ValueError(f"{ct2_dir}: tokenizer has {len(tokenizer)} tokens, the model {vocab_size}")


def _token_id(tokenizer: WhisperTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"the tokenizer has no {token} token")
    return token_id


def build_generation_config(
    tokenizer: WhisperTokenizerFast,
    *,
    vocab_size: int,
    suppress_ids: list[int],
    suppress_ids_begin: list[int] | None,
    lang_ids: list[int] | None,
    alignment_heads: list[list[int]] | None,
    decoder_layers: int,
    decoder_heads: int,
    max_target_positions: int,
) -> GenerationConfig:
    """A Whisper generation config whose token ids all come from the model's own tokenizer."""
    from transformers import GenerationConfig

    eot = _token_id(tokenizer, "<|endoftext|>")
    multilingual = vocab_size >= _MULTILINGUAL_MIN_VOCAB
    if suppress_ids_begin is None:
        # openai-whisper's suppress_blank: no leading space and no immediate end-of-text
        suppress_ids_begin = tokenizer.encode(" ", add_special_tokens=False)[:1] + [eot]
    if alignment_heads is None:
        # CTranslate2's default: every head of the second half of the decoder layers
        layers = range(decoder_layers // 2, decoder_layers)
        alignment_heads = [[layer, head] for layer in layers for head in range(decoder_heads)]

    fields = dict(
        decoder_start_token_id=_token_id(tokenizer, "<|startoftranscript|>"),
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        no_timestamps_token_id=_token_id(tokenizer, "<|notimestamps|>"),
        prev_sot_token_id=_token_id(tokenizer, "<|startofprev|>"),
        suppress_tokens=list(suppress_ids),
        begin_suppress_tokens=list(suppress_ids_begin),
        alignment_heads=[list(pair) for pair in alignment_heads],
        is_multilingual=multilingual,
        max_length=max_target_positions,  # the decoder's whole context (448), like faster-whisper
        max_initial_timestamp_index=50,  # first timestamp at most 1.0 s (openai-whisper's default)
        return_timestamps=False,
        do_sample=False,
        num_beams=1,
    )
    if multilingual:
        # Only multilingual models get language/task tokens: transformers runs language detection
        # whenever lang_to_id is present, and English-only models must not be prompted with one.
        if not lang_ids:
            lang_ids = _language_ids_from_tokenizer(tokenizer)
        lang_to_id = {}
        for token_id in lang_ids:
            token = tokenizer.convert_ids_to_tokens(int(token_id))
            if not (isinstance(token, str) and re.fullmatch(r"<\|[a-z]{2,3}(_[a-z]+)?\|>", token)):
                raise ValueError(f"lang_ids contains {token_id} = {token!r}, not a language token")
            lang_to_id[token] = int(token_id)
        fields.update(
            lang_to_id=lang_to_id,
            task_to_id={
                "transcribe": _token_id(tokenizer, "<|transcribe|>"),
                "translate": _token_id(tokenizer, "<|translate|>"),
            },
            task="transcribe",  # the prompt gets <|transcribe|> after the (detected) language
        )
    return GenerationConfig(**fields)


def _language_ids_from_tokenizer(tokenizer: WhisperTokenizerFast) -> list[int]:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    ids = [tokenizer.convert_tokens_to_ids(f"<|{code}|>") for code in LANGUAGES]
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)

"""Whisper's weights and encoder in plain torch: what decoding needs, without transformers.

Importing transformers' Whisper model costs ~2 s on a 2-core CPU (it pulls torch.distributed
and dynamo), most of a short clip's whole run (issue #18). Decoding needs much less: the
encoder's forward (below) and the decoder's weights, whose arithmetic `streams.py` writes out
anyway. `Whisper` holds them under transformers' module names, so that its state dict *is* a
converted model's `model.safetensors` and both views share their tensors
(`to_transformers` / `from_transformers`); transformers' `WhisperForConditionalGeneration`
stays the reference (`generate`, beam search) and what training adapts.

The encoder's arithmetic is transformers' `WhisperEncoder` with sdpa attention, call for call
(scaled queries, `.contiguous()` where it makes them), so its hidden states are bit-identical
(tested).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class WhisperConfig:
    """The sizes of a Whisper model: the fields of transformers' `WhisperConfig` that the
    arithmetic reads (same names, so `config.json` reads as it is)."""

    vocab_size: int
    num_mel_bins: int
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_layers: int
    decoder_attention_heads: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int
    scale_embedding: bool = False
    activation_function: str = "gelu"

    @classmethod
    def from_dict(cls, values: dict) -> "WhisperConfig":
        names = {field.name for field in fields(cls)}
        config = cls(**{key: value for key, value in values.items() if key in names})
        if config.activation_function != "gelu":  # every released Whisper model
            raise ValueError(f"unsupported activation {config.activation_function!r} (Whisper uses gelu)")
        return config


def _embedding(count: int, dim: int) -> nn.Embedding:
    # uninitialised: the weights come from a file (and `normal_` on the meta device would
    # import torch._refs, ~1 s)
    return nn.Embedding(count, dim, _weight=torch.empty(count, dim))


class Attention(nn.Module):
    """transformers' `WhisperAttention` weights; `forward` is the encoder's self-attention."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.head_dim = d_model // heads
        self.scaling = self.head_dim**-0.5
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], -1, self.head_dim)
        # as transformers: queries scaled before the product, the product at scale 1
        q = (self.q_proj(x) * self.scaling).view(shape).transpose(1, 2).contiguous()
        k = self.k_proj(x).view(shape).transpose(1, 2).contiguous()
        v = self.v_proj(x).view(shape).transpose(1, 2).contiguous()
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2).contiguous()
        return self.out_proj(out.reshape(*x.shape[:-1], -1).contiguous())


class EncoderLayer(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        d = config.d_model
        self.self_attn = Attention(d, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # as transformers: keep float16 activations finite
            limit = torch.finfo(x.dtype).max - 1000
            x = torch.clamp(x, min=-limit, max=limit)
        return x


class Encoder(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        d = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = _embedding(config.max_source_positions, d)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Log-mel features [B, n_mels, 3000] → hidden states [B, 1500, d_model]."""
        frames = self.embed_positions.num_embeddings * 2
        if features.shape[-1] != frames:
            raise ValueError(f"Whisper's encoder takes {frames} feature frames, not {features.shape[-1]}")
        x = F.gelu(self.conv2(F.gelu(self.conv1(features)))).permute(0, 2, 1)
        x = x + self.embed_positions.weight
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class DecoderLayer(nn.Module):
    """Weights only: `streams.WhisperStreams` runs the decoder."""

    def __init__(self, config: WhisperConfig):
        super().__init__()
        d = config.d_model
        self.self_attn = Attention(d, config.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = Attention(d, config.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.activation_fn = nn.GELU()


class Decoder(nn.Module):
    """Weights only: `streams.WhisperStreams` runs the decoder."""

    def __init__(self, config: WhisperConfig):
        super().__init__()
        d = config.d_model
        self.embed_tokens = _embedding(config.vocab_size, d)
        self.embed_positions = _embedding(config.max_target_positions, d)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        self.embed_scale = math.sqrt(d) if config.scale_embedding else 1.0


class Whisper(nn.Module):
    """A Whisper model's weights under transformers' names (`model.encoder…`, `model.decoder…`,
    `proj_out` tied to the token embedding) with the encoder's forward."""

    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.encoder = Encoder(config)
        self.model.decoder = Decoder(config)
        self.proj_out = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.proj_out.weight = self.model.decoder.embed_tokens.weight

    @property
    def encoder(self) -> Encoder:
        return self.model.encoder

    @property
    def decoder(self) -> Decoder:
        return self.model.decoder

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def get_encoder(self) -> Encoder:
        return self.model.encoder

    def get_decoder(self) -> Decoder:
        return self.model.decoder


def load(directory: Union[str, Path]) -> Whisper:
    """A transformers Whisper directory (config.json + model.safetensors, as the converted-model
    cache holds) → `Whisper` in eval mode, float32 as stored."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = WhisperConfig.from_dict(json.loads((directory / "config.json").read_text(encoding="utf-8")))
    return _over(config, load_file(str(directory / WEIGHTS_FILE)))


def from_transformers(model: nn.Module) -> Whisper:
    """`Whisper` over a transformers `WhisperForConditionalGeneration`'s tensors (shared)."""
    return _over(WhisperConfig.from_dict(model.config.to_dict()), dict(model.state_dict()))


def _over(config: WhisperConfig, state: dict[str, torch.Tensor]) -> Whisper:
    """`Whisper` whose parameters are `state`'s tensors themselves (no copy)."""
    with torch.device("meta"):  # no random initialisation: every tensor comes from `state`
        whisper = Whisper(config)
    state.setdefault("proj_out.weight", state["model.decoder.embed_tokens.weight"])
    whisper.load_state_dict(state, strict=True, assign=True)
    whisper.proj_out.weight = whisper.model.decoder.embed_tokens.weight  # tied again after `assign`
    return whisper.eval().requires_grad_(False)


def to_transformers(whisper: Whisper, config_dir: Union[str, Path]) -> nn.Module:
    """transformers' `WhisperForConditionalGeneration` over `whisper`'s tensors (shared), with
    the config of `config_dir` (imports transformers' Whisper model: ~2 s the first time)."""
    from transformers import WhisperConfig as HFWhisperConfig
    from transformers import WhisperForConditionalGeneration

    config = HFWhisperConfig.from_pretrained(str(config_dir), local_files_only=True)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model.load_state_dict(dict(whisper.state_dict()), strict=True, assign=True)
    model.tie_weights()
    if any(tensor.is_meta for tensor in (*model.parameters(), *model.buffers())):
        raise RuntimeError("transformers' Whisper model has tensors that the weights do not give")
    return model.eval()

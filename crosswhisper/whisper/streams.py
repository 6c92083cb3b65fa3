"""Both streams of a Whisper decoder in one *row* (DESIGN §1.3, two-stream attention), on a
static KV cache, with the decoder's arithmetic written out in plain torch calls.

The call over a block of r pending tokens and γ drafts is one sequence of T = r + γ + (γ + 1)
tokens:

    [ pending_1 … pending_r, d_1 … d_γ  |  pending_r, d_1 … d_γ ]
      control stream (adapter off)         predictive stream (LoRA delta on)

The control tokens attend causally to the committed prefix and to each other. The predictive
tokens reuse the control stream's keys/values of the committed prefix and of pending_1 …
pending_{r−1} (one cache, computed by the frozen model, as training builds it: one pending
token x_c over the teacher's prefix), x_c attends to itself, the drafts to x_c and to each
other (bidirectional). Both halves carry the same positions. A commit keeps the first `keep`
control tokens in the cache; the next call writes over everything after them.

Why this and not `dual_stream.HFDualStream` (two rows through transformers' own decoder): on a
2-core CPU, with the ~250-token prompts of long-form windows, tiny.en's decoder body costs
(eval/benchmark.py numbers in eval/README.md) 8.7 ms for one row of 8 tokens against 12.4 ms
for two rows of 4, and transformers' per-call machinery (masks, cache objects, module hooks)
costs 1.3–2 ms of a 5 ms step; the plain calls below give bit-identical hidden states for the
control stream alone (tested). `HFDualStream` stays for training, for text LMs and for blank
branches, which this layout does not compute.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..decoding import BlockOutput
from ..dual_stream import CONTROL, PREDICTIVE, LogitsProcessor, project


@dataclass(frozen=True)
class _Linear:
    """A linear layer's weights, with the LoRA delta's factors when the adapter targets it."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    lora_a_t: Optional[torch.Tensor] = None  # [in, rank]
    lora_b_t: Optional[torch.Tensor] = None  # [rank, out], LoRA scaling included

    def __call__(self, x: torch.Tensor, predictive: Optional[slice] = None) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if predictive is not None and self.lora_a_t is not None:
            # the delta of the predictive tokens only: the control tokens get base(x) alone
            out[:, predictive] += (x[:, predictive] @ self.lora_a_t) @ self.lora_b_t
        return out


def _linear_parts(module: nn.Module) -> _Linear:
    """An nn.Linear, a fused `GatedLoRALinear` or a peft LoRA layer → `_Linear`."""
    from ..dual_stream import GatedLoRALinear

    if isinstance(module, GatedLoRALinear):
        return _Linear(module.base.weight, module.base.bias, module.A_t, module.B_t)
    if isinstance(module, nn.Linear):
        return _Linear(module.weight, module.bias)
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Linear) and len(getattr(module, "active_adapters", ())) == 1:
        name = module.active_adapters[0]
        a = module.lora_A[name].weight
        b = module.lora_B[name].weight * module.scaling[name]
        return _Linear(base.weight, base.bias, a.detach().t().to(base.weight.dtype), b.detach().t().to(base.weight.dtype))
    raise TypeError(f"unsupported decoder layer {type(module).__name__}")


@dataclass(frozen=True)
class _Layer:
    self_norm: nn.LayerNorm
    q: _Linear
    k: _Linear
    v: _Linear
    out: _Linear
    cross_norm: nn.LayerNorm
    cross_q: _Linear
    cross_k: _Linear
    cross_v: _Linear
    cross_out: _Linear
    final_norm: nn.LayerNorm
    fc1: _Linear
    fc2: _Linear
    activation: nn.Module
    scaling: float


@dataclass(frozen=True)
class _Decoder:
    layers: tuple[_Layer, ...]
    embed_tokens: torch.Tensor
    embed_positions: torch.Tensor
    embed_scale: float
    final_norm: nn.LayerNorm
    heads: int
    head_dim: int


_DECODERS: "weakref.WeakKeyDictionary[nn.Module, _Decoder]" = weakref.WeakKeyDictionary()


def _decoder(decoder: nn.Module) -> _Decoder:
    """The weights of a transformers `WhisperDecoder` (possibly holding LoRA layers), read once
    per decoder; a decoder with trainable (unfused peft) LoRA layers is read again every time,
    since its scaled B matrices are copies that training would leave behind."""
    cached = _DECODERS.get(decoder)
    if cached is not None:
        return cached
    from peft.tuners.lora import LoraLayer

    trainable = any(isinstance(module, LoraLayer) for module in decoder.modules())
    layers = []
    for layer in decoder.layers:
        attention, cross = layer.self_attn, layer.encoder_attn
        parts = _Layer(
            layer.self_attn_layer_norm,
            _linear_parts(attention.q_proj), _linear_parts(attention.k_proj),
            _linear_parts(attention.v_proj), _linear_parts(attention.out_proj),
            layer.encoder_attn_layer_norm,
            _linear_parts(cross.q_proj), _linear_parts(cross.k_proj),
            _linear_parts(cross.v_proj), _linear_parts(cross.out_proj),
            layer.final_layer_norm, _linear_parts(layer.fc1), _linear_parts(layer.fc2),
            layer.activation_fn, attention.scaling,
        )
        if parts.cross_k.lora_a_t is not None or parts.cross_v.lora_a_t is not None:
            # the audio keys/values are computed once per window for both streams
            raise TypeError("an adapter on the audio keys/values is not supported by the one-row layout")
        layers.append(parts)
    first = decoder.layers[0].self_attn
    made = _Decoder(
        tuple(layers), decoder.embed_tokens.weight, decoder.embed_positions.weight,
        float(getattr(decoder, "embed_scale", 1.0)), decoder.layer_norm, first.num_heads, first.head_dim,
    )
    if not trainable:
        _DECODERS[decoder] = made
    return made


def supported(decoder: nn.Module) -> bool:
    """Whether `WhisperStreams` can run this decoder (else `HFDualStream` does)."""
    try:
        _decoder(decoder)
    except (TypeError, AttributeError):
        return False
    return True


def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class WhisperStreams:
    """`DualStreamModel` over one window of a Whisper decoder: the one-row layout above.

    decoder: the `WhisperDecoder` (its LoRA layers, if any, are the predictive stream's delta)
    lm_head: the output projection
    encoder_hidden_states: [1, 1500, d_model] of the window
    process_logits, max_length, observe_index, head_dtype: as `HFDualStream`'s
    drafting: run the predictive stream too (γ ≥ 1 needs it)
    """

    def __init__(
        self,
        decoder: nn.Module,
        lm_head: nn.Module,
        encoder_hidden_states: torch.Tensor,
        *,
        process_logits: LogitsProcessor,
        drafting: bool,
        max_length: int,
        observe_index: Optional[int] = None,
        head_dtype: Optional[torch.dtype] = None,
    ):
        self.weights = _decoder(decoder)
        self.head_dtype = head_dtype
        if drafting and not any(layer.q.lora_a_t is not None for layer in self.weights.layers):
            raise ValueError("drafting needs a decoder with an adapter (LoRA layers)")
        self.lm_head = lm_head
        self.process_logits = process_logits
        self.drafting = drafting
        self.vocab_size = lm_head.weight.shape[0]
        self.max_length = max_length
        self.observe_index = observe_index
        self.observed_logits: Optional[torch.Tensor] = None
        self.length = 0
        self._tokens = torch.empty(0, dtype=torch.long, device=encoder_hidden_states.device)
        self._block_tokens = self._tokens
        self._block = 0
        w = self.weights
        shape = (1, -1, w.heads, w.head_dim)
        with torch.inference_mode():
            # the audio keys/values of every layer, once per window, shared by both streams
            self._audio = [
                (layer.cross_k(encoder_hidden_states).view(shape).transpose(1, 2).contiguous(),
                 layer.cross_v(encoder_hidden_states).view(shape).transpose(1, 2).contiguous())
                for layer in w.layers
            ]
        self._keys = self._values = None  # [layers, 1, heads, capacity, head_dim], made on first use
        self.captured: dict[int, torch.Tensor] = {}  # see `_run`

    def reset(self, batch: int) -> None:
        if batch != 1:
            raise NotImplementedError("batched decoding of several sequences is not implemented yet")
        self.length, self._block = 0, 0
        self._tokens = self._tokens[:0]
        self._block_tokens = self._tokens

    def _reserve(self, end: int, like: torch.Tensor) -> None:
        """Cache room for `end` positions (committed + this call's block)."""
        capacity = 0 if self._keys is None else self._keys.shape[3]
        if end <= capacity:
            return
        w = self.weights
        size = max(end, self.max_length + 64)
        keys = like.new_empty(len(w.layers), 1, w.heads, size, w.head_dim)
        values = torch.empty_like(keys)
        if self._keys is not None:
            keys[:, :, :, : self.length] = self._keys[:, :, :, : self.length]
            values[:, :, :, : self.length] = self._values[:, :, :, : self.length]
        self._keys, self._values = keys, values

    def _mask(self, past: int, r: int, gamma: int, dtype, device) -> Optional[torch.Tensor]:
        """Additive mask [T, past + T] of the layout in the module doc (None: attend to all)."""
        L = r + gamma
        P = gamma + 1 if self.drafting and gamma else 0
        T = L + P
        if T == 1:
            return None
        allowed = torch.zeros(T, past + T, dtype=torch.bool, device=device)
        allowed[:, :past] = True
        allowed[:L, past : past + L] = torch.tril(torch.ones(L, L, dtype=torch.bool, device=device))
        if P:
            allowed[L:, past : past + r - 1] = True  # the control stream's pending tokens before x_c
            allowed[L, past + L] = True  # x_c: itself
            allowed[L + 1 :, past + L :] = True  # the drafts: x_c and every draft
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)

    @torch.inference_mode()
    def forward_block(self, pending: torch.Tensor, drafts: torch.Tensor, *, branches: bool = False) -> BlockOutput:
        r, gamma = pending.shape[1], drafts.shape[1]
        if gamma and not self.drafting:
            raise ValueError("drafts given to a control-only model (drafting=False)")
        past = self.length
        if past + r + gamma > self.max_length:
            raise ValueError(f"block of {r + gamma} tokens at {past} exceeds {self.max_length} positions")
        device = pending.device
        L = r + gamma
        P = gamma + 1 if gamma else 0
        block = torch.cat([pending, drafts], dim=1)
        tokens = torch.cat([block, block[:, r - 1 :]], dim=1) if P else block
        positions = torch.arange(past, past + L, device=device)
        if P:
            positions = torch.cat([positions, positions[r - 1 :]])
        hidden = self._run(tokens, positions, past, self._mask(past, r, gamma, self.weights.embed_tokens.dtype, device),
                           slice(L, tokens.shape[1]) if P else None)
        self._block = L
        if self.observe_index is not None and past <= self.observe_index < past + r:
            at = self.observe_index - past
            self.observed_logits = project(hidden[:, at : at + 1], self.lm_head, self.head_dtype)[0, 0]
        # the last pending token and the drafts predict what we need: P_1..P_{γ+1} and Q_1..Q_{γ+1}
        rows = hidden[:, r - 1 : L]
        if P:
            rows = torch.cat([rows, hidden[:, L:]])  # [2, γ+1, d]: CONTROL, PREDICTIVE
        logits = project(rows, self.lm_head, self.head_dtype)
        token_index = torch.arange(past + r, past + r + gamma + 1, device=device)
        self._block_tokens = block[0]
        sequence = torch.cat([self._tokens, self._block_tokens])
        logits = self.process_logits(logits, token_index, sequence)
        return BlockOutput(
            control_logits=logits[CONTROL : CONTROL + 1],
            predictive_logits=logits[PREDICTIVE : PREDICTIVE + 1] if P else None,
        )

    def _run(self, tokens, positions, past: int, mask, predictive: Optional[slice], capture=None) -> torch.Tensor:
        """The decoder over `tokens` [1, T] at `positions` after `past` cached positions, writing
        their keys/values at [past, past + T); the LoRA delta on the `predictive` tokens.
        `capture`: {layer: [heads]} whose cross-attention scores [heads, T, frames] (before the
        softmax) are kept in `self.captured` (word alignment). → final hidden states [1, T, d]."""
        w = self.weights
        T, end = tokens.shape[1], past + tokens.shape[1]
        x = F.embedding(tokens, w.embed_tokens)
        if w.embed_scale != 1.0:
            x = x * w.embed_scale
        x = x + w.embed_positions[positions]
        self._reserve(end, x)
        heads, head_dim = w.heads, w.head_dim

        def split(y):  # [1, T, d] → [1, heads, T, head_dim]
            return y.view(1, T, heads, head_dim).transpose(1, 2)

        for i, layer in enumerate(w.layers):
            y = _norm(layer.self_norm, x)
            q = split(layer.q(y, predictive) * layer.scaling)
            self._keys[i, :, :, past:end] = split(layer.k(y, predictive))
            self._values[i, :, :, past:end] = split(layer.v(y, predictive))
            o = F.scaled_dot_product_attention(q, self._keys[i, :, :, :end], self._values[i, :, :, :end], attn_mask=mask, scale=1.0)
            x = x + layer.out(o.transpose(1, 2).reshape(1, T, -1), predictive)
            y = _norm(layer.cross_norm, x)
            q = split(layer.cross_q(y, predictive) * layer.scaling)
            keys, values = self._audio[i]
            if capture and i in capture:
                picked = capture[i]
                self.captured[i] = (q[0, picked] @ keys[0, picked].transpose(-1, -2)).float()
            o = F.scaled_dot_product_attention(q, keys, values, scale=1.0)
            x = x + layer.cross_out(o.transpose(1, 2).reshape(1, T, -1), predictive)
            y = _norm(layer.final_norm, x)
            x = x + layer.fc2(layer.activation(layer.fc1(y, predictive)), predictive)
        return _norm(w.final_norm, x)

    @torch.inference_mode()
    def teacher_force(self, tokens: list[int], capture: dict[int, list[int]]) -> torch.Tensor:
        """The control stream over a whole sequence (nothing cached before, nothing kept):
        logits [T, V] (unprocessed), with the cross-attention scores of `capture`'s heads in
        `self.captured` ({layer: [heads, T, frames]})."""
        device = self._audio[0][0].device
        ids = torch.tensor([tokens], device=device)
        T = ids.shape[1]
        causal = self._mask(0, T, 0, self.weights.embed_tokens.dtype, device)  # T pending tokens, no drafts
        self.captured = {}
        hidden = self._run(ids, torch.arange(T, device=device), 0, causal, None, capture)
        return project(hidden, self.lm_head, self.head_dtype)[0]

    def commit(self, keep: int) -> None:
        """Keep the first `keep` tokens of the last block (their control keys/values are already
        in place; the next call writes over the rest)."""
        if not 0 <= keep <= self._block:
            raise ValueError(f"cannot keep {keep} of a {self._block}-token block")
        self.length += keep
        self._tokens = torch.cat([self._tokens, self._block_tokens[:keep]])
        self._block = 0

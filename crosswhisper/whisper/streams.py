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

import sys
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..decoding import BlockOutput
from ..dual_stream import CONTROL, PREDICTIVE, ExactArgmax, LogitsProcessor, project, small_linear
from ..lora import LoraFactors


@dataclass(frozen=True)
class _Linear:
    """A linear layer's weights, with the LoRA delta's factors when the adapter targets it."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    lora_a_t: Optional[torch.Tensor] = None  # [in, rank]
    lora_b_t: Optional[torch.Tensor] = None  # [rank, out], LoRA scaling included

    def __call__(self, x: torch.Tensor, predictive: Optional[slice] = None) -> torch.Tensor:
        # a drafting call's few rows through the weight's blocked copy (faster on a CPU); the
        # plain loop's one row through transformers' kernel, bit for bit
        out = small_linear(x, self.weight, self.bias) if predictive is not None else F.linear(x, self.weight, self.bias)
        if predictive is not None and self.lora_a_t is not None:
            # the delta of the predictive tokens only: the control tokens get base(x) alone
            if x.shape[0] == 1:  # one window: its predictive tokens are consecutive rows, one fused product
                out[0, predictive].addmm_(x[0, predictive] @ self.lora_a_t, self.lora_b_t)
            else:
                out[:, predictive] += (x[:, predictive] @ self.lora_a_t) @ self.lora_b_t
        return out


def _linear_parts(module: nn.Module, factors: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> _Linear:
    """An nn.Linear (with the adapter's `factors` (Aᵀ, s·Bᵀ) for it, if any), a fused
    `GatedLoRALinear` or a peft LoRA layer → `_Linear`."""
    from ..dual_stream import GatedLoRALinear

    if factors is not None:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"LoRA factors for a {type(module).__name__}, not a linear layer")
        return _Linear(module.weight, module.bias, *factors)
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


_DECODERS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _decoder(decoder: nn.Module, lora: Optional[LoraFactors] = None) -> _Decoder:
    """The weights of a Whisper decoder (transformers' `WhisperDecoder`, or `model.Decoder`),
    with the LoRA delta of `lora` (factors named from the Whisper model's root) or of the LoRA
    layers it holds; read once per decoder and adapter. A decoder with trainable (unfused peft)
    LoRA layers is read again every time, since its scaled B matrices are copies that training
    would leave behind."""
    cached = _DECODERS.get(decoder, {}).get(lora)
    if cached is not None:
        return cached
    trainable = False
    if lora is None and "peft" in sys.modules:  # (peft's layers exist only if peft was imported)
        from peft.tuners.lora import LoraLayer

        trainable = any(isinstance(module, LoraLayer) for module in decoder.modules())
    factors = lora.under("model.decoder.") if lora is not None else {}
    if lora is not None and len(factors) != len(lora.by_module):
        raise TypeError("the one-row layout adapts decoder layers only")

    def parts(name: str, module: nn.Module) -> _Linear:
        return _linear_parts(module, factors.pop(name, None))

    layers = []
    for i, layer in enumerate(decoder.layers):
        at = f"layers.{i}."
        attention = layer.self_attn
        linears = {
            name: parts(at + name, layer.get_submodule(name)) for name in (
                "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                "encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj", "encoder_attn.out_proj", "fc1", "fc2",
            )
        }
        made = _Layer(
            layer.self_attn_layer_norm,
            linears["self_attn.q_proj"], linears["self_attn.k_proj"], linears["self_attn.v_proj"], linears["self_attn.out_proj"],
            layer.encoder_attn_layer_norm,
            linears["encoder_attn.q_proj"], linears["encoder_attn.k_proj"], linears["encoder_attn.v_proj"],
            linears["encoder_attn.out_proj"],
            layer.final_layer_norm, linears["fc1"], linears["fc2"],
            layer.activation_fn, attention.scaling,
        )
        if made.cross_k.lora_a_t is not None or made.cross_v.lora_a_t is not None:
            # the audio keys/values are computed once per window for both streams
            raise TypeError("an adapter on the audio keys/values is not supported by the one-row layout")
        layers.append(made)
    if factors:
        raise TypeError(f"LoRA factors for layers the one-row layout does not adapt: {sorted(factors)[:3]}")
    first = decoder.layers[0].self_attn
    made = _Decoder(
        tuple(layers), decoder.embed_tokens.weight, decoder.embed_positions.weight,
        float(getattr(decoder, "embed_scale", 1.0)), decoder.layer_norm, first.num_heads, first.head_dim,
    )
    if not trainable:
        _DECODERS.setdefault(decoder, {})[lora] = made
    return made


def supported(decoder: nn.Module, lora: Optional[LoraFactors] = None) -> bool:
    """Whether `WhisperStreams` can run this decoder (else `HFDualStream` does)."""
    try:
        _decoder(decoder, lora)
    except (TypeError, AttributeError):
        return False
    return True


def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class WhisperStreams:
    """`DualStreamModel` over one window per row of a Whisper decoder: the one-row layout above,
    for a batch of B windows (DESIGN §1.6).

    decoder: the decoder (`model.Decoder` or transformers' `WhisperDecoder`)
    lora: the adapter's factors (the predictive stream's delta); None: the decoder's own LoRA
        layers if it holds any (a peft model)
    lm_head: the output projection
    encoder_hidden_states: [B, 1500, d_model], one window per row
    process_logits: as `HFDualStream`'s; or one per row (prompts of different lengths)
    max_length, head_dtype: as `HFDualStream`'s
    exact: what the logits processing reads (`dual_stream.ExactArgmax`): the block's logits may
        then come from the screened projection (the processed argmax stays the float32 one)
    observe_index: as `HFDualStream`'s; or one per row (`observed[row]`)
    drafting: run the predictive stream too (γ ≥ 1 needs it)

    Each row has its own committed length. Row b's block is written at its own cache slots
    [past_b, past_b + T) at its own positions; slots a row must not read (the padding of a
    shorter prompt) stay masked. While every row sits at the same slot, the call is the
    single-row call's arithmetic, row for row.
    """

    def __init__(
        self,
        decoder: nn.Module,
        lm_head: nn.Module,
        encoder_hidden_states: torch.Tensor,
        *,
        process_logits: Union[LogitsProcessor, Sequence[LogitsProcessor]],
        drafting: bool,
        max_length: int,
        observe_index: Union[None, int, Sequence[Optional[int]]] = None,
        head_dtype: Optional[torch.dtype] = None,
        lora: Optional[LoraFactors] = None,
        exact: Optional[ExactArgmax] = None,
    ):
        self.weights = _decoder(decoder, lora)
        self.head_dtype = head_dtype
        self.exact = exact
        if drafting and not any(layer.q.lora_a_t is not None for layer in self.weights.layers):
            raise ValueError("drafting needs a decoder with an adapter (LoRA layers)")
        batch = encoder_hidden_states.shape[0]
        self.batch = batch
        self.lm_head = lm_head
        self._processors = _per_row(process_logits, batch, "process_logits")
        self._observe = _per_row(observe_index, batch, "observe_index")
        self.observed: list[Optional[torch.Tensor]] = [None] * batch  # [V] per row at its `observe_index`
        self.drafting = drafting
        self.vocab_size = lm_head.weight.shape[0]
        self.max_length = max_length
        self._device = encoder_hidden_states.device
        w = self.weights
        shape = (batch, -1, w.heads, w.head_dim)
        with torch.inference_mode():
            # the audio keys/values of every layer, once per window, shared by both streams
            self._audio_all = [
                (layer.cross_k(encoder_hidden_states).view(shape).transpose(1, 2).contiguous(),
                 layer.cross_v(encoder_hidden_states).view(shape).transpose(1, 2).contiguous())
                for layer in w.layers
            ]
        self._keys = self._values = None  # [layers, B, heads, capacity, head_dim], made on first use
        self.captured: dict[int, torch.Tensor] = {}  # see `_run`
        self.reset(batch)

    @property
    def observed_logits(self) -> Optional[torch.Tensor]:
        """Row 0's `observed` (the single-window API)."""
        return self.observed[0]

    @property
    def length(self) -> int:
        """Committed tokens of row 0 (the single-window API)."""
        return self._lengths[0]

    def reset(self, batch: int, padding: Optional[Sequence[int]] = None) -> None:
        if batch != self.batch:
            raise ValueError(f"{self.batch} windows were encoded for this model, not {batch}")
        padding = list(padding) if padding is not None else [0] * batch
        if len(padding) != batch or min(padding) < 0:
            raise ValueError(f"padding must give a count ≥ 0 for each of the {batch} rows, got {padding}")
        self._ids = list(range(batch))  # each row's index in the batch given at construction
        self._audio = self._audio_all
        self._past = [0] * batch  # cache slots in use (dead ones included)
        self._dead = [0] * batch  # slots at the start that hold padding
        self._lengths = [0] * batch  # committed tokens
        self._pad = padding  # padding at the start of the next block (the first one only)
        self._tokens = [torch.empty(0, dtype=torch.long, device=self._device) for _ in range(batch)]
        self._block_tokens = self._tokens
        self._block = 0
        if self._keys is not None and self._keys.shape[1] != batch:
            self._keys = self._values = None

    def select(self, rows: Sequence[int]) -> None:
        rows = list(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self._device)
        self._audio = [(keys[index], values[index]) for keys, values in self._audio]
        if self._keys is not None:
            self._keys, self._values = self._keys[:, index], self._values[:, index]
        for name in ("_ids", "_past", "_dead", "_lengths", "_pad", "_tokens", "_block_tokens"):
            values = getattr(self, name)
            setattr(self, name, [values[row] for row in rows])

    def _reserve(self, end: int, like: torch.Tensor) -> None:
        """Cache room for `end` slots (committed + this call's block) in every row."""
        capacity = 0 if self._keys is None else self._keys.shape[3]
        if end <= capacity:
            return
        w = self.weights
        size = max(end, self.max_length + 64)
        # zeros, not empty: a row of a ragged batch reads (masked) slots it never wrote, and an
        # additive mask does not hide a NaN that uninitialised memory may hold
        keys = like.new_zeros(len(w.layers), like.shape[0], w.heads, size, w.head_dim)
        values = torch.zeros_like(keys)
        if self._keys is not None:
            keys[:, :, :, :capacity] = self._keys
            values[:, :, :, :capacity] = self._values
        self._keys, self._values = keys, values

    def _pattern(self, r: int, gamma: int, device) -> torch.Tensor:
        """Which block token reads which: bool [T, T] of the layout in the module doc."""
        L = r + gamma
        P = gamma + 1 if self.drafting and gamma else 0
        T = L + P
        allowed = torch.zeros(T, T, dtype=torch.bool, device=device)
        allowed[:L, :L] = torch.tril(torch.ones(L, L, dtype=torch.bool, device=device))
        if P:
            allowed[L:, : r - 1] = True  # the control stream's pending tokens before x_c
            allowed[L, L] = True  # x_c: itself
            allowed[L + 1 :, L:] = True  # the drafts: x_c and every draft
        return allowed

    def _mask(self, past: int, r: int, gamma: int, dtype, device) -> Optional[torch.Tensor]:
        """Additive mask [T, past + T] for rows at the same slot (None: attend to all)."""
        block = self._pattern(r, gamma, device)
        T = block.shape[0]
        if T == 1:
            return None
        allowed = torch.ones(T, past + T, dtype=torch.bool, device=device)
        allowed[:, past:] = block
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)

    def _ragged_mask(self, r: int, gamma: int, end: int, dtype, device) -> torch.Tensor:
        """Additive mask [B, 1, T, end] for rows at their own slots: each row reads its live
        committed slots and its block by the layout; its padding only from itself."""
        block = self._pattern(r, gamma, device)
        T = block.shape[0]
        allowed = torch.zeros(len(self._past), T, end, dtype=torch.bool, device=device)
        for row, (past, dead, pad) in enumerate(zip(self._past, self._dead, self._pad)):
            allowed[row, :, dead:past] = True
            allowed[row, :, past : past + T] = block
            if pad:  # padding: nobody reads it; each padding token reads itself (a softmax needs one)
                allowed[row, :, past : past + pad] = False
                allowed[row, torch.arange(pad), past + torch.arange(pad)] = True
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)

    @torch.inference_mode()
    def forward_block(self, pending: torch.Tensor, drafts: torch.Tensor, *, branches: bool = False) -> BlockOutput:
        B, r, gamma = pending.shape[0], pending.shape[1], drafts.shape[1]
        if gamma and not self.drafting:
            raise ValueError("drafts given to a control-only model (drafting=False)")
        if B != len(self._past):
            raise ValueError(f"{B} rows given to a batch of {len(self._past)}")
        for length, pad in zip(self._lengths, self._pad):
            if length + r - pad + gamma > self.max_length:
                raise ValueError(f"block of {r - pad + gamma} tokens at {length} exceeds {self.max_length} positions")
        device = pending.device
        dtype = self.weights.embed_tokens.dtype
        L = r + gamma
        P = gamma + 1 if gamma else 0
        block = torch.cat([pending, drafts], dim=1)
        tokens = torch.cat([block, block[:, r - 1 :]], dim=1) if P else block
        T = tokens.shape[1]
        local = torch.arange(L, device=device)
        if P:
            local = torch.cat([local, local[r - 1 :]])
        uniform = len(set(self._past)) == 1 and not any(self._dead) and not any(self._pad)
        if uniform:  # every row at the same slot: one slice of the cache, one mask
            past = self._past[0]
            positions, write = local + past, past
            mask = self._mask(past, r, gamma, dtype, device)
        else:
            offsets = torch.tensor([length - pad for length, pad in zip(self._lengths, self._pad)], device=device)
            positions = (offsets[:, None] + local).clamp_min(0)  # the padding's positions are never read
            write = torch.tensor(self._past, device=device)[:, None] + torch.arange(T, device=device)
            mask = self._ragged_mask(r, gamma, max(self._past) + T, dtype, device)
        hidden = self._run(tokens, positions, write, mask, slice(L, T) if P else None)
        self._block = L

        # the last pending token and the drafts predict what we need: P_1..P_{γ+1} and Q_1..Q_{γ+1}
        rows = hidden[:, r - 1 : L]
        if P:
            rows = torch.stack([rows, hidden[:, L:]], dim=1).flatten(0, 1)  # [2B, γ+1, d]: CONTROL, PREDICTIVE
        # [B, streams, γ+1, V]; screened where that is faster: exact wherever processing and argmax look
        logits = project(rows, self.lm_head, self.head_dtype, exact=self.exact).unflatten(0, (B, -1))
        self._block_tokens, sequences, first = [], [], []
        for row in range(B):
            length, pad, index = self._lengths[row], self._pad[row], self._ids[row]
            observe = self._observe[index]
            if observe is not None and length <= observe < length + r - pad:
                at = pad + observe - length
                # (screened too: <|nospeech|> is one of the exact ids, the normalizer within ~1e-5)
                self.observed[index] = project(hidden[row : row + 1, at : at + 1], self.lm_head, self.head_dtype,
                                               exact=self.exact)[0, 0]
            self._block_tokens.append(block[row, pad:])
            sequences.append(torch.cat([self._tokens[row], self._block_tokens[row]]))
            first.append(length + r - pad)
        token_index = torch.tensor(first, device=device)[:, None] + torch.arange(gamma + 1, device=device)
        for row in range(B):
            logits[row] = self._processors[self._ids[row]](logits[row], token_index[row], sequences[row])
        return BlockOutput(
            control_logits=logits[:, CONTROL],
            predictive_logits=logits[:, PREDICTIVE] if P else None,
        )

    def _run(self, tokens, positions, write, mask, predictive: Optional[slice], capture=None) -> torch.Tensor:
        """The decoder over `tokens` [B, T] at `positions` ([T], or [B, T]), writing their
        keys/values at cache slots `write`: [write, write + T) in every row (an int), or each
        row's own slots ([B, T]); the LoRA delta on the `predictive` tokens.
        `capture`: {layer: [heads]} whose cross-attention scores [heads, T, frames] (before the
        softmax) of row 0 are kept in `self.captured` (word alignment). → final hidden states [B, T, d]."""
        w = self.weights
        B, T = tokens.shape
        x = F.embedding(tokens, w.embed_tokens)
        if w.embed_scale != 1.0:
            x = x * w.embed_scale
        x = x + w.embed_positions[positions]
        if isinstance(write, int):
            end = write + T
            rows = None
        else:
            end = int(write.max()) + 1
            rows = torch.arange(B, device=tokens.device)[:, None]
        self._reserve(end, x)
        heads, head_dim = w.heads, w.head_dim

        def split(y):  # [B, T, d] → [B, heads, T, head_dim]
            return y.view(B, T, heads, head_dim).transpose(1, 2)

        for i, layer in enumerate(w.layers):
            y = _norm(layer.self_norm, x)
            q = split(layer.q(y, predictive) * layer.scaling)
            if rows is None:
                self._keys[i, :, :, write:end] = split(layer.k(y, predictive))
                self._values[i, :, :, write:end] = split(layer.v(y, predictive))
            else:  # [B, T, heads, head_dim] into each row's own slots
                self._keys[i][rows, :, write] = layer.k(y, predictive).view(B, T, heads, head_dim)
                self._values[i][rows, :, write] = layer.v(y, predictive).view(B, T, heads, head_dim)
            o = F.scaled_dot_product_attention(q, self._keys[i, :, :, :end], self._values[i, :, :, :end], attn_mask=mask, scale=1.0)
            x = x + layer.out(o.transpose(1, 2).reshape(B, T, -1), predictive)
            y = _norm(layer.cross_norm, x)
            q = split(layer.cross_q(y, predictive) * layer.scaling)
            keys, values = self._audio[i]
            if capture and i in capture:
                picked = capture[i]
                self.captured[i] = (q[0, picked] @ keys[0, picked].transpose(-1, -2)).float()
            o = F.scaled_dot_product_attention(q, keys, values, scale=1.0)
            x = x + layer.cross_out(o.transpose(1, 2).reshape(B, T, -1), predictive)
            y = _norm(layer.final_norm, x)
            x = x + layer.fc2(layer.activation(layer.fc1(y, predictive)), predictive)
        return _norm(w.final_norm, x)

    @torch.inference_mode()
    def teacher_force(self, tokens: list[int], capture: dict[int, list[int]]) -> torch.Tensor:
        """The control stream over a whole sequence of row 0's window (nothing cached before,
        nothing kept): logits [T, V] (unprocessed), with the cross-attention scores of
        `capture`'s heads in `self.captured` ({layer: [heads, T, frames]})."""
        if len(self._past) != 1:
            raise ValueError("teacher_force runs on a single window")
        device = self._device
        ids = torch.tensor([tokens], device=device)
        T = ids.shape[1]
        causal = self._mask(0, T, 0, self.weights.embed_tokens.dtype, device)  # T pending tokens, no drafts
        self.captured = {}
        hidden = self._run(ids, torch.arange(T, device=device), 0, causal, None, capture)
        return project(hidden, self.lm_head, self.head_dtype)[0]

    def commit(self, keep: Union[int, Sequence[int]]) -> None:
        """Keep the first `keep` tokens of the last block in each row (padding not counted;
        their control keys/values are already in place; the next call writes over the rest)."""
        keeps = [keep] if isinstance(keep, int) else list(keep)
        if len(keeps) != len(self._past):
            raise ValueError(f"{len(keeps)} counts to keep for {len(self._past)} rows")
        for row, count in enumerate(keeps):
            real = self._block_tokens[row]
            if not 0 <= count <= real.shape[0]:
                raise ValueError(f"cannot keep {count} of a {real.shape[0]}-token block")
            pad = self._pad[row]
            self._past[row] += pad + count
            self._dead[row] += pad
            self._lengths[row] += count
            self._tokens[row] = torch.cat([self._tokens[row], real[:count]])
        self._pad = [0] * len(keeps)
        self._block = 0


def _per_row(value, batch: int, name: str) -> list:
    """A per-row argument: one value for every row, or a sequence of B."""
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise ValueError(f"{name}: {len(value)} values for {batch} rows")
        return list(value)
    return [value] * batch

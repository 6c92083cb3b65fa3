"""The int8 compute type's product: weights quantised per output channel once, activations per
row at every call, int8 × int8 → int32 (`torch._int_mm`: oneDNN, AMX/VNNI on recent x86 CPUs),
as CTranslate2 quantises for faster-whisper's `compute_type="int8"` on a CPU.

Why per row and not torch.ao's dynamic quantisation: that one scales the activations per
*tensor*, so a row's result would depend on the other rows of the call. Here a row's int8
activations depend on that row alone and integer sums are exact in any order, so each row's
output is the same whichever rows share the call (a window alone or in a batch, one token or a
drafted block): the product adds no difference between a drafted block and a greedy step, and
lossless drafting stays token-identical to greedy at this compute type (DESIGN §1.7; tested,
and why whisper/loading.py still keeps the decoder's body in float32). Model-agnostic: no
Whisper code here.
"""

from __future__ import annotations

import platform
import weakref
from typing import Optional

import torch
from torch import nn

_EPS = 1e-12  # an all-zero row or channel: any positive scale gives zeros


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float → (int8 [M, K], float32 scale [M, 1]) with x ≈ q · scale, each row on its own."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min_(_EPS).div_(127.0)
    return torch.round(x.float() / scale).to(torch.int8), scale


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights (per output channel) and int8 activations (per row)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        # a row of the weight = an output channel; in slices: a vocabulary projection's float
        # temporaries would otherwise add hundreds of MB to the process's peak
        parts = [quantize_rows(rows) for rows in weight.detach().split(4096)]
        q, scale = torch.cat([q for q, _ in parts]), torch.cat([scale for _, scale in parts])
        self.out_features, self.in_features = q.shape
        # kept [out, in] and passed transposed: oneDNN's int8 product was faster that way here
        self.register_buffer("weight_q", q, persistent=False)
        self.register_buffer("weight_scale", scale.view(1, -1), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        q, scale = quantize_rows(x.reshape(-1, shape[-1]))
        out = torch._int_mm(q, self.weight_q.t()).float().mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def int8_is_slow() -> bool:
    """Whether this CPU lacks the instructions oneDNN's int8 products are fast with: an x86 CPU
    below AVX-512 (no VNNI, no AMX). On a 2-core AMD EPYC with AVX2 (2026-12-01) `torch._int_mm`
    made tiny.en's long-form decoding 3–6× slower than float32 (RTFx 3.4 / 2.3 against 11.6 /
    13.2, eval/README.md); on an AVX-512 Xeon with AMX it was the fastest type."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return x86 and not torch.backends.cpu.get_cpu_capability().startswith("AVX512")


_INT8: "weakref.WeakKeyDictionary[nn.Module, Int8Linear]" = weakref.WeakKeyDictionary()


def int8_linear(linear: nn.Module) -> Int8Linear:
    """The int8 twin of a linear layer (made once per layer, kept while the layer lives)."""
    made = _INT8.get(linear)
    if made is None:
        made = _INT8[linear] = Int8Linear(linear.weight, getattr(linear, "bias", None))
    return made


def quantize_linears(module: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` inside `module` (in place) by its `Int8Linear`; returns it."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child.weight, child.bias))
        else:
            quantize_linears(child)
    return module

"""The int8 compute type's product: weights quantised per output channel once, activations per
row at every call, int8 × int8 → int32 (`torch._int_mm`: oneDNN, AMX/VNNI on recent x86 CPUs;
fbgemm's AVX2 kernels below that), as CTranslate2 quantises for faster-whisper's
`compute_type="int8"` on a CPU.

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

import logging
import platform
import warnings
import weakref
from typing import Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

_EPS = 1e-12  # an all-zero row or channel: any positive scale gives zeros


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float → (int8 [M, K], float32 scale [M, 1]) with x ≈ q · scale, each row on its own."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min_(_EPS).div_(127.0)
    return torch.round(x.float() / scale).to(torch.int8), scale


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights (per output channel) and int8 activations (per row).

    Two kernels, one rule (a row's output depends on that row alone): on CPUs with fast int8
    products in oneDNN (AVX-512 VNNI / AMX) `torch._int_mm` on int8 rows; below that (AVX2),
    where `_int_mm` is 3–6× slower than float32, fbgemm's AVX2 int8 product (`_FbgemmProduct`).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        # a row of the weight = an output channel; in slices: a vocabulary projection's float
        # temporaries would otherwise add hundreds of MB to the process's peak
        weight = weight.detach()
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scale = torch.empty(weight.shape[0], 1, dtype=torch.float32, device=weight.device)
        for start in range(0, weight.shape[0], 4096):
            q[start : start + 4096], scale[start : start + 4096] = quantize_rows(weight[start : start + 4096])
        self.out_features, self.in_features = q.shape
        self.register_buffer("bias", None if bias is None else bias.detach().float(), persistent=False)
        self.fbgemm = None
        if use_fbgemm() and self.in_features >= 2:
            try:
                self.fbgemm = _FbgemmProduct(q, scale)
            except (RuntimeError, AttributeError) as error:  # a torch without quantized tensors
                logger.debug("fbgemm's int8 product unavailable (%s): torch._int_mm", error)
        if self.fbgemm is None:
            # kept [out, in] and passed transposed: oneDNN's int8 product was faster that way here
            self.register_buffer("weight_q", q, persistent=False)
            self.register_buffer("weight_scale", scale.view(1, -1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if self.fbgemm is not None:
            out = self.fbgemm(rows.float())
        else:
            q, scale = quantize_rows(rows)
            out = torch._int_mm(q, self.weight_q.t()).float().mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8" + (
            " (fbgemm)" if self.fbgemm is not None else "")


class _FbgemmProduct:
    """x @ Wᵀ for float rows x and int8 W (per output channel), through fbgemm's dynamic int8
    linear (`quantized::linear_dynamic`), made row-exact.

    fbgemm quantises the whole input with one scale and zero point from its minimum and maximum,
    so a row's result would depend on the other rows of the call. Each row is therefore mapped
    affinely onto [−1, 1] first (x = mid + half · x′, clamped so that rounding cannot step
    outside), and a fixed anchor row holding −1 and 1 is appended: fbgemm's quantisation
    parameters are then the same in every call, integer sums are exact, and the affine map is
    undone per row and per output element (x·Wᵀ = half · x′·Wᵀ + mid · W·1) with separate,
    exactly rounded multiplications and additions. `reduce_range`: 7-bit activations, as fbgemm
    needs on AVX2 (its 16-bit pair sums would saturate with 8 bits): relative error of tiny.en-sized
    products 0.015 against 0.009 for `_int_mm`'s symmetric 8-bit rows, for a vocabulary projection
    ~3× faster than float32's fastest kernel on a 2-core AVX2 EPYC (tiny.en, 1 / 8 rows: 2.7 / 4.2
    ms against 7.4 / 15.0; `_int_mm` 14.4 / 111; eval/README.md). Two passes (x′'s 7 bits, then the 7-bit
    remainder, ~14 bits) brought the error to the weight's alone (0.004) for twice the time, and
    changed neither WER nor, much, tokens per forward on a held-out long file (tiny.en: 1.68 →
    1.72, float32 1.83): what int8 costs the drafts is the weight's rounding."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"  # the packing decides the kernel
        try:
            with warnings.catch_warnings():  # quantized tensors are deprecated (torch 2.13): only the packing uses one
                warnings.simplefilter("ignore", UserWarning)
                weight = torch._make_per_channel_quantized_tensor(
                    q, scale.view(-1).double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(weight, None)
        finally:
            torch.backends.quantized.engine = previous
        # W·1 of the int8 weight, [out]: integer row sums (exact in float32) times the scales
        self.weight_sums = q.sum(dim=1, dtype=torch.float32).mul_(scale.view(-1))
        self.anchor = torch.zeros(1, q.shape[1])
        self.anchor[0, 0], self.anchor[0, 1] = -1.0, 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        low, high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
        mid = (high + low) * 0.5
        half = ((high - low) * 0.5).clamp_min_(_EPS)
        unit = ((x - mid) / half).clamp_(-1.0, 1.0)
        # x′ rounded to fbgemm's grid (7-bit steps of 2/127 over [−1, 1]) before the call, so that
        # fbgemm's own rounding has nothing to decide: without it a row sometimes depended on
        # the call (random data, 2 of 4 shapes in one run), most likely near-ties rounded by its
        # vector or its scalar path, split where its threads' chunks end
        out = torch.ops.quantized.linear_dynamic(torch.cat([_on_grid(unit), self.anchor]), self.packed, True)[:-1]
        return out.mul_(half).add_(mid * self.weight_sums)


def _on_grid(unit: torch.Tensor) -> torch.Tensor:
    """Values in [−1, 1] → the nearest of k · 2/127, k = −63 … 63: points of the 7-bit grid
    that fbgemm derives from the anchor row's −1 and 1 (zero point 64, k = −64 … 63)."""
    return torch.round(unit * 63.5).clamp_(-63.0, 63.0).div_(63.5)


def use_fbgemm() -> bool:
    """Whether int8 products run on fbgemm rather than `torch._int_mm`: on x86 CPUs below
    AVX-512, where oneDNN has no fast int8 kernel and fbgemm has AVX2 ones."""
    return _below_avx512() and _has_fbgemm()


def int8_is_slow() -> bool:
    """Whether this CPU has no fast int8 product at all: an x86 CPU below AVX-512 (no VNNI, no
    AMX) whose torch has no fbgemm. On a 2-core AMD EPYC with AVX2 (2026-12-01) `torch._int_mm`
    made tiny.en's long-form decoding 3–6× slower than float32 (RTFx 3.4 / 2.3 against 11.6 /
    13.2, eval/README.md); fbgemm's product made it faster than float32 there (2026-12-02)."""
    return _below_avx512() and not _has_fbgemm()


def _has_fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def _below_avx512() -> bool:
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

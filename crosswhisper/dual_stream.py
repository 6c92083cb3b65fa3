"""Both streams of a Hugging Face decoder in ONE forward call (DESIGN §1.3).

Design: *two rows*. Row 0 is the control stream (LoRA delta gated off), row 1 the predictive
stream (gated on); they run as a batch of two through the unmodified transformers decoder, each
with its own KV cache row. The adapter stays a standard peft adapter (saved and loaded with
peft's API): while training, the gate is a forward hook on every peft `lora_B` that multiplies
the LoRA delta by a per-row factor; for inference `StreamGate.fuse` swaps peft's layers for
`GatedLoRALinear`, which adds the delta to the predictive row only.

The predictive row does not keep a prefix of its own: after every commit the control row's
keys/values of the newly committed tokens are copied into it (the A3 two-stream idea: one
cache of the committed prefix, computed by the control stream). So the committed prefix is
computed once, by the frozen model, and the predictive stream always reads exactly the
prefix it was trained on, never keys contaminated by the bidirectional draft block.

Blank branches (`forward_block(branches=True)`): the drafts a pass refills with were made next to
the draft it rejected, and that one wrong token costs most of what drafting could give (base:
2.2 tokens per forward against 3.5 if the drafts knew the correction; eval/draft_bounds.py).
So the predictive row may also carry, after the block, one branch per outcome of the pass
(n = 0 … γ drafts accepted): the last token that outcome keeps before its correction (or bonus),
then γ placeholders where the correction and the tokens after it go, i.e. the block the next
pass would run, with blanks for drafts. The branch reads the block's earlier tokens through the control row's keys/values of
this call (`_stream_attention`): as a commit would leave them. The loop then drafts from the
branch of the outcome that happened. Cost: (γ+1)² more tokens per row and γ(γ+1) more rows in
the vocabulary projection.

Why two rows and not one row with per-token gating (the two-stream layout
[pending, d_1..d_γ | x_last, d_1..d_γ] in one sequence): both do nearly the same arithmetic.
Measured on this 2-core CPU (`python eval/benchmark.py call_cost --blocks 1 8 17 33`, tiny.en,
rank-32 LoRA, medians of 20, ratio to a plain single-token step of 7.6 ms): two rows × 1 / 8 /
17 / 33 tokens cost 1.26 / 2.08 / 3.19 / 4.72×, one row of 1 / 15 / 33 / 65 tokens 1.01 / 2.08 /
3.04 / 4.40× — and that one-row figure leaves out the per-token LoRA routing and the custom
attention layout inside every layer that it would need. Two rows use the stock decoder; the
≤ 7 % difference did not pay for a second attention path. On a GPU it would: on an H200
(base, float16, 2026-11-26) two rows of 4–33 tokens cost 1.82–1.87× a single-token step and
one row of 7–65 tokens 1.23–1.25× (eval/README.md, GPU).
Where a call's time goes instead: reading the weights (the 80 MB vocabulary projection evicts
the caches, see `project`), the cross-attention over 1500 audio frames for both rows, and the
LoRA matmuls (computed for the predictive row only).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import os
import platform
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from .decoding import BlockOutput
from .disk_memo import read_memo, remember
from .quantized import int8_linear

logger = logging.getLogger(__name__)

CONTROL, PREDICTIVE = 0, 1


def attention_backends(device: torch.device):
    """The attention kernels a decoder call may use on `device`.

    On CUDA, PyTorch may pick cuDNN's attention for a masked float16 call, and cuDNN prepares an
    execution plan for every new shape: the decoding loop's key length grows by a few tokens
    every call, so each call would prepare a new plan. Flash / memory-efficient attention
    serve any shape.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


# a function (logits [B, K, V], absolute token indices [K]) -> processed logits, in place allowed
# A model's logits processing (suppressed tokens, Whisper's timestamp rules, ...), as a function
# of the prefix: (logits [B, K, V], token_index [K], tokens [N]) → logits, where logits[:, k]
# predict the token at position token_index[k] and tokens[: token_index[k]] come before it
# (prompt included; inside a block, the drafts before it: DESIGN §1.5).
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight)


def _w_xt(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (weight @ x.t()).t()


# Layouts of the same product; which one is fastest depends on the row count and the CPU's
# BLAS paths (2-core EPYC, tiny.en: 2–10 rows W@xᵀ 1.6–4.7 ms vs 5.4–8.4 ms for x@Wᵀ; 2-core
# Xeon: W@xᵀ for 1 and ≥ 10 rows, linear for 2–8). They differ only in summation order (float
# rounding). A third, x @ (a contiguous copy of Wᵀ), was dropped (2026-12-01): on the Xeon it
# was never the fastest (tiny.en and base, 1–32 rows) and its copy doubled the projection's
# memory (80 MB for tiny.en, the difference between a 530 and a 610 MB CLI run).
_KERNELS = (_linear, _w_xt)


def _packed(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# Rows up to which a drafting call's linear layers run on oneDNN's blocked copy of the weight
# (2-core AMD EPYC, AVX2, 2026-12-02: MKL's product of 4-8 rows was slower than its one-row
# path, tiny.en's fc1 0.43 → 0.7 ms; base's γ = 3 call went 57.7 → 50.2 ms, tiny.en's 29.5 →
# 28.3: eval/README.md, "A cheaper drafting call"). Above it (a prompt) the product is
# compute-bound and MKL's.
BLOCKED_ROWS = 32
_BLOCKED_WEIGHTS = WeakTensorKeyDictionary()  # weight → its blocked copy (None: this build has none)


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a call of a few rows (2…BLOCKED_ROWS) of a float32 CPU
    weight through its blocked copy, made on first use; the same product up to float rounding
    (the summation order differs). Anything else, and one row (transformers' own kernel), is
    `F.linear`."""
    rows = x.numel() // x.shape[-1]
    if 1 < rows <= BLOCKED_ROWS and not torch.is_grad_enabled():
        packed = _BLOCKED_WEIGHTS.get(weight, False)
        if packed is False:
            packed = _BLOCKED_WEIGHTS[weight] = _pack(weight)
        if packed is not None:
            return _packed(x.reshape(rows, x.shape[-1]), packed, bias).view(*x.shape[:-1], -1)
    return F.linear(x, weight, bias)


def _pack(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """oneDNN's blocked layout of a float32 CPU weight (None where this build has none)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 8)  # laid out for ~8 rows; serves any count
    except (AttributeError, RuntimeError):
        return None


class _Projection:
    """Per output layer: the fastest kernel per row count.

    Besides the two layouts above, the weight in oneDNN's blocked layout (reordered once, what
    inductor's freezing does on x86 CPUs): on a 2-core AMD EPYC (AVX2, 2026-12-01, tiny.en's
    51865 × 384 projection, `python eval/benchmark.py projection`, `x@Wᵀ` / `W@xᵀ` / oneDNN,
    ms) 1 row 11.5 / 11.0 / 6.2, 2 rows 25.4 / 6.9 / 6.5, 8 rows 23.7 / 11.3 / 9.0; base
    1 row 15.6 / 16.2 / 8.4, 8 rows 32.7 / 15.1 / 11.4 (MKL's product is slow there;
    eval/README.md). The copy costs the projection's size again, so it is made only to be
    timed and kept only while some row count runs on it."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.detach()
        self.kernel: dict[int, Callable] = {}
        self.packed: Optional[torch.Tensor] = None
        self.screen: Optional[_Screen] = None  # made on first use (`screened`)
        self.screen_possible = True
        self.screen_rows: dict[int, bool] = {}  # row count → whether the screen is faster

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        kernel = self.kernel.get(rows)
        if kernel is None:
            # One choice per shape and row count in a process (and on a machine: remembered on
            # disk), not per module: kernels differ in their last bits, and two copies of a model
            # (a peft-wrapped and a merged one, two workers' bundles) must compute the same
            # logits whatever the timing noise said.
            key = (tuple(self.weight.shape), self.weight.dtype, x.device.type, rows)
            kernel = _CHOSEN_KERNELS.get(key)
            if kernel is None:
                kernel = _remembered(key, _KERNEL_CHOICES)
                if kernel is _packed and self.packed is None:
                    self.packed = _pack(self.weight)
                    if self.packed is None:  # remembered, but this weight has no blocked copy here
                        kernel = None
                if kernel is None:
                    kernel = self._fastest(x)
                    _remember(key, kernel.__name__)
                _CHOSEN_KERNELS[key] = kernel
            self.kernel[rows] = kernel
            if _packed in self.kernel.values():
                if self.packed is None:
                    self.packed = _pack(self.weight)
            else:
                self.packed = None  # nobody runs on it (a row count timed later packs again)
        if kernel is _packed:
            return _packed(x, self.packed)
        return kernel(x, self.weight)

    def screened(self, x: torch.Tensor, exact: ExactArgmax) -> torch.Tensor:
        """The logits of `x` through the screen where it was timed faster than the full product
        for this row count (once per process and machine, as the kernels), else the full product."""
        rows = x.shape[0]
        use = self.screen_rows.get(rows)
        if use is None:
            key = (tuple(self.weight.shape), self.weight.dtype, x.device.type, rows, "screen")
            use = _CHOSEN_KERNELS.get(key)
            if use is None:
                remembered = _remembered(key, _SCREEN_CHOICES)
                if remembered is None or (remembered and self._screen() is None):
                    use = self._screen_pays(x, exact)
                    _remember(key, "screen" if use else "full")
                else:
                    use = remembered
                _CHOSEN_KERNELS[key] = use
            self.screen_rows[rows] = use
        if use and self._screen() is not None:
            return self.screen(x, exact)
        return self(x)

    def _screen(self) -> Optional[_Screen]:
        if self.screen is None and self.screen_possible:
            self.screen = _make_screen(self.weight)
            self.screen_possible = self.screen is not None
        return self.screen

    def _screen_pays(self, x: torch.Tensor, exact: ExactArgmax) -> bool:
        screen = self._screen()
        if screen is None:
            return False
        times = _median_times({"full": lambda: self(x), "screen": lambda: screen(x, exact)})
        # a near tie goes to the screen: where it runs for every row count, the 80 MB blocked
        # float32 copy is not kept (its 40 MB float16 copy is); measured ties at 8 rows (tiny.en,
        # 7.4 against 8.4 ms, end to end the same) otherwise kept both, +60 MB of resident memory
        pays = times["screen"] < 1.1 * times["full"]
        logger.debug("vocabulary projection of %d rows: screened %s", x.shape[0], pays)
        if pays:  # the full product of this row count was run only to time it
            self.kernel.pop(x.shape[0], None)
            if _packed not in self.kernel.values():
                self.packed = None
        elif not any(self.screen_rows.values()):
            self.screen = None  # nobody runs on it: its packed copy is freed
        return pays

    def _fastest(self, x: torch.Tensor) -> Callable:
        if x.device.type != "cpu":
            return _linear
        if self.packed is None:
            self.packed = _pack(self.weight)  # `__call__` drops it again if it does not win
        runs = {kernel: functools.partial(kernel, x, self.weight) for kernel in _KERNELS}
        if self.packed is not None:
            runs[_packed] = functools.partial(_packed, x, self.packed)
        times = _median_times(runs)
        best = min(times, key=times.get)
        logger.debug("vocabulary projection of %d rows: %s", x.shape[0], best.__name__)
        return best


def _median_times(runs: dict) -> dict:
    """Median seconds of each call of `runs` (a key → a function of no arguments), interleaved
    over 4 rounds, the first a warm-up."""
    times = {key: [] for key in runs}
    for _ in range(4):
        for key, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(spent[1:]) for key, spent in times.items()}


# The CPU kernel timed fastest per machine, torch build, thread count, weight shape and row count,
# remembered on disk (disk_memo): timing them again took 0.5 s of a 6 s command-line run on a
# 10 s clip (2-core EPYC), and every process on one machine then computes the same last bits.
_KERNEL_MEMO = "projection-kernels.json"
_KERNEL_MEMO_LIMIT = 512


def _machine_key(key: tuple) -> str:
    return "|".join(map(str, (_cpu_name(), torch.__version__, torch.backends.cpu.get_cpu_capability(),
                              torch.get_num_threads(), *key)))


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    except OSError:
        names = []
    return (names[0] if names else platform.processor() or platform.machine()) + f" ×{os.cpu_count()}"


def _remembered(key: tuple, choices: dict):
    """The choice (a value of `choices`, by its name) remembered for `key` on this machine, or
    None: time them. Only CPUs are remembered."""
    if key[2] != "cpu":
        return None
    return choices.get(read_memo(_KERNEL_MEMO).get(_machine_key(key)))


def _remember(key: tuple, name: str) -> None:
    if key[2] == "cpu":
        remember(_KERNEL_MEMO, _machine_key(key), name, limit=_KERNEL_MEMO_LIMIT)


_KERNEL_CHOICES = {kernel.__name__: kernel for kernel in (*_KERNELS, _packed)}
_SCREEN_CHOICES = {"screen": True, "full": False}


# (weight shape, dtype, device type, rows) -> the kernel timed fastest for it in this process
# (and with "screen" appended: whether the screened projection is faster)
_CHOSEN_KERNELS: dict[tuple, Union[Callable, bool]] = {}
_PROJECTIONS: "weakref.WeakKeyDictionary[nn.Module, _Projection]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ExactArgmax:
    """What a model's logits processing and argmax read, for `project(..., exact=...)`: the
    logits it must get exactly. The screened projection computes the rest through a float16 copy
    of the weight, within a proven bound, and every token that could be the best one exactly.
    Valid for processing that decides on the ids below `exact_from` only through their best one
    and masks them (sets them to −inf) only all at once or among `not_max` (Whisper's: its words).
    """

    exact_from: int  # ids from here on are always exact (Whisper: end-of-text, the special tokens, the timestamps)
    # ids below exact_from that the processing may mask alone (suppressed words): left out of the
    # screen's threshold, so the best word left after masking is among the exact ones
    not_max: torch.Tensor


class _Screen:
    """The projection screened through a float16 copy of the weight (fbgemm's fp16 product: half
    the bytes of float32, AVX2 kernels), then computed in float32 wherever it decides: on a 2-core
    AMD EPYC, tiny.en, 1 row 3.6 ms against 6.1 for float32's fastest kernel, 8 rows 7.4 against
    8.4 (`eval/benchmark.py projection`).

    Bound (per row x, vocabulary row w): |x·w − fp16 product| ≤ ‖x‖ (‖w − fp16(w)‖ + 4·d·u·‖w‖),
    the weight's rounding by Cauchy–Schwarz plus both products' float32 accumulation
    (u = 2⁻²⁴), with room to spare (measured errors on real decoder states: < 1 % of it). A token
    is computed exactly when its screened logit is within twice the bound of the best eligible
    one: no other token can reach the best true value, so the argmax and the best token of any
    masked subset that keeps one eligible token are exact. The other logits are off by less than
    the bound (tiny.en: ~0.01; the log-normalizer by ~1e-5 at most, 3e-7 on average)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight, None)
        d = weight.shape[1]
        # in slices: a float16 copy of the whole matrix and its difference would add ~200 MB
        # to the peak resident memory of a short command-line run
        self.error = max(
            float((((part - part.half().float()).norm(dim=1)) + 4 * d * 2.0**-24 * part.norm(dim=1)).max())
            for part in weight.split(4096)
        )
        self.tails: dict[int, torch.Tensor] = {}  # exact_from → the weight's rows from there on

    def __call__(self, x: torch.Tensor, exact: ExactArgmax) -> torch.Tensor:
        logits = torch.ops.quantized.linear_dynamic_fp16(x, self.packed)
        slack = x.norm(dim=1, keepdim=True) * self.error
        # the threshold from the best eligible token (the exact ids are overwritten below anyway)
        masked_values = logits[:, exact.not_max]
        logits[:, exact.not_max] = -float("inf")
        logits[:, exact.exact_from :] = -float("inf")
        best = logits.amax(dim=1, keepdim=True)
        logits[:, exact.not_max] = masked_values
        rows, ids = (logits >= best - 2 * slack).nonzero(as_tuple=True)
        logits[rows, ids] = (x[rows] * self.weight[ids]).sum(-1)
        tail = self.tails.get(exact.exact_from)
        if tail is None:
            tail = self.tails[exact.exact_from] = self.weight[exact.exact_from :].contiguous()
        logits[:, exact.exact_from :] = (tail @ x.t()).t()  # (MKL's x @ tailᵀ of a few rows is slow on AVX2)
        return logits


def _make_screen(weight: torch.Tensor) -> Optional[_Screen]:
    """A screen for a float32 CPU weight where this torch build has fbgemm's fp16 product."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    try:
        return _Screen(weight)
    except (AttributeError, RuntimeError):
        return None


def project(
    hidden: torch.Tensor, lm_head: nn.Module, dtype: Optional[torch.dtype] = None, *, exact: Optional[ExactArgmax] = None,
) -> torch.Tensor:
    """Output projection of [B, K, d] hidden states onto the vocabulary.

    The vocabulary projection is the largest single cost of a decoder call on a CPU, and the
    fastest BLAS layout for it depends on the number of rows: at inference each row count is
    timed once (`_Projection`) and its fastest layout reused. `dtype` (e.g. bfloat16; torch.int8:
    `quantized.Int8Linear`): the product in that type (a copy of the weight, made once),
    returned as float32 logits; each row's logits do not depend on the other rows (what
    lossless drafting needs: tested). `exact` (float32 only): the projection may be screened
    (`_Screen`, where that was timed faster for the row count): the logits `exact` names and
    every possible best token are float32 products, the others within a proven bound, so the
    processed argmax is the float32 one (lossless decoding stays token-identical).
    """
    weight = lm_head.weight
    if torch.is_grad_enabled():
        return lm_head(hidden)
    if dtype == torch.int8:  # the int8 compute type: per-channel weights, per-row activations
        return int8_linear(lm_head)(hidden)
    if dtype is not None and dtype != weight.dtype:
        low = _LOW_PRECISION_WEIGHTS.get(lm_head)
        if low is None or low.dtype != dtype or low.device != weight.device:
            low = _LOW_PRECISION_WEIGHTS[lm_head] = weight.detach().to(dtype)
        logits = F.linear(hidden.to(dtype), low).float()
        return logits if getattr(lm_head, "bias", None) is None else logits + lm_head.bias
    projection = _PROJECTIONS.get(lm_head)
    if projection is None or projection.weight.device != weight.device or projection.weight.dtype != weight.dtype:
        projection = _PROJECTIONS[lm_head] = _Projection(weight)
    B, K, d = hidden.shape
    has_bias = getattr(lm_head, "bias", None) is not None
    if exact is not None and not has_bias:
        logits = projection.screened(hidden.reshape(B * K, d), exact)
    else:
        logits = projection(hidden.reshape(B * K, d))
    logits = logits.view(B, K, -1)
    return logits if not has_bias else logits + lm_head.bias


_LOW_PRECISION_WEIGHTS: "weakref.WeakKeyDictionary[nn.Module, torch.Tensor]" = weakref.WeakKeyDictionary()


STREAM_ATTENTION = "crosswhisper-streams"  # attention implementation name (transformers registry)


def _stream_attention(module, query, key, value, attention_mask, **kwargs):
    """Decoder self-attention of the two-row call where the predictive row may also read the
    control row's keys/values of the current block (`StreamGate.control_reads`, an additive mask
    [1, 1, T, L] over the block's L tokens). The blank branches use it to see the block's
    tokens as the control stream computed them: causal and clean, as the committed prefix they
    stand for will be, not as the predictive row saw them next to later (possibly wrong) drafts.
    The control row attends exactly as in plain attention (its own call, its own keys). Without
    `control_reads` this is plain attention.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gate = getattr(module, "crosswhisper_gate", None)
    reads = None if gate is None else gate.control_reads
    if reads is None or query.shape[0] != 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    T, L = reads.shape[-2], reads.shape[-1]
    control, _ = sdpa_attention_forward(module, query[:1], key[:1], value[:1], attention_mask[:1], **kwargs)
    block = slice(key.shape[2] - T, key.shape[2] - T + L)  # the control row's keys of this block
    keys = torch.cat([key[1:], key[:1, :, block]], dim=2)
    values = torch.cat([value[1:], value[:1, :, block]], dim=2)
    mask = torch.cat([attention_mask[1:], reads], dim=-1)
    kwargs["is_causal"] = False
    predictive, _ = sdpa_attention_forward(module, query[1:], keys, values, mask, **kwargs)
    return torch.cat([control, predictive], dim=0), None


def install_stream_attention(model: nn.Module, gate: "StreamGate") -> int:
    """Give every decoder self-attention layer of `model` `_stream_attention`, driven by `gate`.
    Only those layers change (each gets a copy of the config naming that attention); the
    encoder, the audio cross-attention and the mask preparation keep theirs. Returns the count."""
    from transformers import AttentionInterface

    AttentionInterface.register(STREAM_ATTENTION, _stream_attention)
    count = 0
    for name, module in model.named_modules():
        # Whisper's `decoder.layers.N.self_attn`, a text LM's `layers.N.self_attn`
        if name.endswith("self_attn") and ".layers." in name and "encoder." not in name:
            if module.config._attn_implementation != "sdpa":
                return 0  # eager & co.: no branches (HFDualStream falls back to plain drafting)
            module.config = copy.copy(module.config)
            module.config._attn_implementation = STREAM_ATTENTION
            module.crosswhisper_gate = gate
            count += 1
    gate.stream_attention = count > 0
    return count


def cache_argument(module: nn.Module, cache) -> dict:
    """The KV-cache keyword of a transformers model's forward: `cache` where the installed version
    has it (it deprecates `past_key_values`, to be removed in 5.40), else `past_key_values`."""
    forward = type(module).forward
    name = _CACHE_KEYWORD.get(forward)
    if name is None:
        name = _CACHE_KEYWORD[forward] = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    return {name: cache}


_CACHE_KEYWORD: dict = {}


class StreamGate:
    """Per-row switch of the LoRA delta: `delta *= gate[row]` on every LoRA layer's output.

    On a peft model the gate is a forward hook on every `lora_B` (training and saving keep
    working); `fuse()` swaps peft's layers for `GatedLoRALinear`, which computes the same sum
    without peft's per-layer Python overhead, for inference.
    """

    def __init__(self, model: nn.Module):
        self._gate: Optional[torch.Tensor] = None
        # the predictive row's reads of the control row's block keys during one call (see
        # `_stream_attention`), and whether the model's layers can do it (`install_stream_attention`)
        self.control_reads: Optional[torch.Tensor] = None
        self.stream_attention = False
        # rows [start, stop) with the adapter on, the rest off: lets fused layers compute the
        # LoRA delta for those rows only; None = use `gate` (a multiplication)
        self.rows_on: Optional[slice] = None
        self._handles = []
        for name, module in model.named_modules():
            # peft keeps each adapter's B matrix in a ModuleDict `lora_B`; its output is the delta / scaling
            if name.split(".")[-2:-1] == ["lora_B"]:
                self._handles.append(module.register_forward_hook(self._hook))
        if not self._handles:
            raise ValueError("the model has no LoRA layers to gate (is it a peft LoRA model?)")
        install_stream_attention(model, self)

    @property
    def gate(self) -> Optional[torch.Tensor]:
        """[B, 1, 1] factor of the LoRA delta per row; None = adapter on everywhere."""
        return self._gate

    @gate.setter
    def gate(self, value: Optional[torch.Tensor]) -> None:
        self._gate, self.rows_on = value, None

    def select(self, rows_on: slice, batch: int, device) -> None:
        """Adapter on in rows `rows_on` of a batch of `batch` rows, off in the others."""
        gate = torch.zeros(batch, 1, 1, device=device)
        gate[rows_on] = 1.0
        self._gate, self.rows_on = gate, rows_on

    def _hook(self, module, inputs, output):
        if self.gate is None:
            return output
        return output * self.gate.to(output.dtype)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def fuse(self, model: nn.Module) -> int:
        """Replace every peft LoRA linear layer of `model` by a `GatedLoRALinear` on this gate
        (inference only: the model can no longer be trained or saved with peft). Returns the count."""
        from peft.tuners.lora import LoraLayer

        self.remove()
        targets = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
        for name, module in targets:
            if len(module.active_adapters) != 1 or not isinstance(module.base_layer, nn.Linear):
                raise ValueError(f"{name}: only one active LoRA adapter on a linear layer can be fused")
            adapter = module.active_adapters[0]
            if adapter in getattr(module, "lora_variant", {}):  # DoRA & co. are not plain LoRA sums
                raise ValueError(f"{name}: LoRA variant {type(module.lora_variant[adapter]).__name__} cannot be fused")
            parent_name, _, child = name.rpartition(".")
            fused = GatedLoRALinear(
                module.base_layer,
                module.lora_A[adapter].weight,
                module.lora_B[adapter].weight * module.scaling[adapter],
                self,
            )
            setattr(model.get_submodule(parent_name), child, fused)
        return len(targets)


def lora_factors(lora_A: torch.Tensor, lora_B_scaled: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Aᵀ, s·Bᵀ) contiguous, in the dtype and on the device of the base layer's weight `like`
    (peft keeps adapter weights in float32 under a float16/bfloat16 model: match the layer)."""
    to = {"dtype": like.dtype, "device": like.device}
    return lora_A.detach().to(**to).t().contiguous(), lora_B_scaled.detach().to(**to).t().contiguous()


class GatedLoRALinear(nn.Module):
    """base(x) + gate · (x Aᵀ)(s B)ᵀ: a peft LoRA layer's inference arithmetic, per-row gated.

    Why not peft's own layer: its forward costs ~0.19 ms of Python per call on a 2-core CPU,
    +7.7 ms on a 15 ms tiny.en decoder step (40 layers). With the gate at 0 the control row
    gets `base(x) + 0`, bit-identical to the base model.
    """

    def __init__(self, base: nn.Linear, lora_A: torch.Tensor, lora_B_scaled: torch.Tensor, gate: StreamGate):
        super().__init__()
        self.base = base
        a_t, b_t = lora_factors(lora_A, lora_B_scaled, base.weight)
        self.register_buffer("A_t", a_t)
        self.register_buffer("B_t", b_t)
        self.stream_gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rows = self.stream_gate.rows_on
        if rows is not None:  # the delta of the rows that use it, nothing for the others
            if rows.start != rows.stop:
                out[rows] += (x[rows] @ self.A_t) @ self.B_t
            return out
        delta = (x @ self.A_t) @ self.B_t
        gate = self.stream_gate.gate
        return out + (delta if gate is None else delta * gate.to(delta.dtype))


def block_mask(
    prefix, cached: int, block: int, dtype: torch.dtype, *, pending: int = 1, branches: bool = False, device=None
) -> torch.Tensor:
    """The predictive stream's attention pattern, one for training and inference: an additive
    mask [rows, 1, T, cached+T] (0 = may attend) for a block of `block` tokens after `cached`
    cached positions, of which row i sees the first prefix_i (`prefix`: an int for one row, or
    a tensor of per-row lengths).

    The block is `pending` tokens (committed but not yet in the cache, the last one x_c) then
    block − pending drafts: the pending tokens attend causally, the drafts see every pending
    token and each other (bidirectional inside the draft block). With `branches`, the γ+1 blank
    branches of γ+1 nodes follow the block (T = block + (γ+1)², γ = block − pending; see
    `HFDualStream.forward_block`): branch n is laid out as the block a pass would run after
    committing n drafts, with placeholders for drafts: its first node (the last committed token)
    sees the prefix and itself, its placeholders see the prefix and the whole branch; nothing
    of the block (`HFDualStream._branch_reads` lets them read the control row's).

    Training (`crosswhisper.training`) is one pending token per row (x_c = the token at cut_i,
    prefix_i = cut_i) over the teacher's cache of the whole example; inference's predictive row
    is prefix = cached = the committed length. `pending=block` is plain causal attention (the
    control row)."""
    gamma = block - pending
    size = gamma + 1  # nodes per branch
    T = block + size * size if branches else block
    if isinstance(prefix, int):
        allowed = torch.zeros(1, 1, T, cached + T, dtype=torch.bool, device=device)
        allowed[:, 0, :, :prefix] = True
    else:  # per-row prefix lengths: the mask is made on their device
        device = prefix.device
        allowed = torch.zeros(prefix.shape[0], 1, T, cached + T, dtype=torch.bool, device=device)
        allowed[:, 0, :, :cached] = torch.arange(cached, device=device).view(1, 1, -1) < prefix.view(-1, 1, 1)
    allowed[:, 0, :block, cached : cached + block] = torch.tril(torch.ones(block, block, dtype=torch.bool, device=device))
    allowed[:, 0, pending:block, cached + pending : cached + block] = True
    if branches:
        for n in range(size):
            first = block + n * size
            allowed[:, 0, first, cached + first] = True
            allowed[:, 0, first + 1 : first + size, cached + first : cached + first + size] = True
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


class HFDualStream:
    """`DualStreamModel` over a transformers decoder: Whisper's (with cross-attention to the
    audio) or a decoder-only LM's body (`LlamaModel` & co., `encoder_hidden_states=None`).

    decoder: the `WhisperDecoder` or the causal LM's base model (possibly holding LoRA layers)
    lm_head: the output projection (tied embeddings)
    encoder_hidden_states: [1, frames, d_model] of the current 30 s window; None for a text LM
    process_logits: the model's logits processors (suppressed tokens, begin-suppress, ...)
    gate: the StreamGate of the adapter, or None for a model without adapter
    drafting: run the predictive row too (needs `gate`); False = control stream alone (γ = 0)
    placeholder_id: the token of empty draft slots, fed to the blank branches
    observe_index: a position of the prompt whose raw (unprocessed) control-stream logits are
        kept in `observed_logits` when the first block computes it (Whisper's no-speech
        probability is read at <|startoftranscript|>)
    head_dtype: the vocabulary projection's compute type (`project`); None: the weight's
    """

    def __init__(
        self,
        decoder: nn.Module,
        lm_head: nn.Module,
        encoder_hidden_states: Optional[torch.Tensor],
        *,
        process_logits: LogitsProcessor,
        gate: Optional[StreamGate],
        drafting: bool,
        max_length: int,
        placeholder_id: Optional[int] = None,
        observe_index: Optional[int] = None,
        head_dtype: Optional[torch.dtype] = None,
    ):
        if drafting and gate is None:
            raise ValueError("drafting needs a model with an adapter (a StreamGate)")
        self.decoder = decoder
        self.lm_head = lm_head
        self.head_dtype = head_dtype
        self.encoder_hidden_states = encoder_hidden_states
        self.process_logits = process_logits
        self.gate = gate
        self.vocab_size = lm_head.weight.shape[0]
        self.max_length = max_length
        self.placeholder_id = placeholder_id
        self.observe_index = observe_index
        self.observed_logits: Optional[torch.Tensor] = None  # [V] at `observe_index`
        self.length = 0  # committed tokens held in the cache
        self._tokens = torch.empty(0, dtype=torch.long)  # those tokens (prompt included)
        self._block_tokens = self._tokens  # the last block's tokens (pending + drafts)
        self._block = 0  # tokens appended by the last forward_block
        self._cache = None
        self._rows = 2 if drafting else 1
        self._audio_keys_values = None  # [(keys, values)] per layer, computed on first use
        self.reset(1)

    def reset(self, batch: int, padding: Optional[Sequence[int]] = None) -> None:
        if batch != 1 and self.encoder_hidden_states is not None:
            raise NotImplementedError("HFDualStream decodes one Whisper window; batches of windows run on WhisperStreams")
        self.batch = batch
        self._batched = batch > 1  # the rows' state below, until the next reset (rows may leave)
        self.length = 0
        self._block = 0
        self._cache = None
        self._tokens = torch.empty(0, dtype=torch.long)
        self._block_tokens = self._tokens
        # batches (`_forward_rows`): every row's block goes to the same cache slots; a row reads
        # only its own live slots (its padding and the drafts it rejected stay behind, dead)
        self._pad = list(padding) if padding is not None else [0] * batch
        self._lengths = [0] * batch  # committed tokens per row (its next position)
        self._live = torch.zeros(batch, 0, dtype=torch.bool)  # [rows, slots]: what each row may read
        self._row_tokens = [torch.empty(0, dtype=torch.long) for _ in range(batch)]
        self._slots = 0  # cache length, dead slots included

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these sequences of the batch (their control and predictive rows)."""
        rows = list(rows)
        batch = self.batch
        keep = rows + [batch + row for row in rows] if self._rows == 2 else rows
        index = torch.tensor(keep, dtype=torch.long)
        if self._cache is not None:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[index.to(layer.keys.device)], layer.values[index.to(layer.keys.device)]
        self._live = self._live[torch.tensor(rows)]
        self._pad = [self._pad[row] for row in rows]
        self._lengths = [self._lengths[row] for row in rows]
        self._row_tokens = [self._row_tokens[row] for row in rows]
        self._block_tokens = [self._block_tokens[row] for row in rows]
        self.batch = len(rows)

    def _new_cache(self):
        """A cache whose cross-attention part already holds the audio's keys/values.

        They are computed once per window, from one row, and shared (expanded) by both streams:
        the audio keys/values are not LoRA targets, so both rows would compute the same thing.
        A text LM gets a plain self-attention cache.
        """
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        if self.encoder_hidden_states is None:
            return DynamicCache(config=self.decoder.config)
        if self._audio_keys_values is None:
            self._audio_keys_values = []
            for layer in self.decoder.layers:
                attention = layer.encoder_attn
                shape = (1, -1, attention.num_heads, attention.head_dim)
                keys = attention.k_proj(self.encoder_hidden_states).view(shape).transpose(1, 2).contiguous()
                values = attention.v_proj(self.encoder_hidden_states).view(shape).transpose(1, 2).contiguous()
                self._audio_keys_values.append((keys, values))
        rows = self._rows
        audio = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self._audio_keys_values]
        config = copy.copy(self.decoder.config)
        config.num_hidden_layers = config.decoder_layers
        return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(audio))

    @torch.inference_mode()
    def forward_block(self, pending: torch.Tensor, drafts: torch.Tensor, *, branches: bool = False) -> BlockOutput:
        if self._batched:
            return self._forward_rows(pending, drafts)
        r, gamma = pending.shape[1], drafts.shape[1]
        rows = self._rows
        two_rows = rows == 2
        if gamma and not two_rows:
            raise ValueError("drafts given to a control-only model (drafting=False)")
        if self.length + r + gamma > self.max_length:
            raise ValueError(f"block of {r + gamma} tokens at {self.length} exceeds {self.max_length} positions")
        if self._cache is None:
            self._cache = self._new_cache()
        L, past = r + gamma, self.length
        device = pending.device
        # blank branches (see BlockOutput.branch_logits): branch n = the block's token before
        # slot n+1 (the last one a commit of n drafts keeps), then γ placeholders at the positions
        # of slots n+1 … n+γ; they need positions up to past + r + 2γ − 1
        branches = branches and two_rows and gamma > 0 and past + r + 2 * gamma <= self.max_length
        branches = branches and self.gate.stream_attention
        if branches and self.placeholder_id is None:
            raise ValueError("blank branches need the placeholder token (placeholder_id)")
        block = torch.cat([pending, drafts], dim=1)
        positions = torch.arange(past, past + L, device=device)
        if branches:
            nodes = torch.full((gamma + 1, gamma + 1), self.placeholder_id, dtype=block.dtype, device=device)
            nodes[:, 0] = block[0, r - 1 :]  # each branch starts from its last committed token
            block = torch.cat([block, nodes.view(1, -1)], dim=1)
            steps = torch.arange(gamma + 1, device=device)
            branch_positions = past + r - 1 + steps.view(-1, 1) + steps  # [branch n, node i]
            positions = torch.cat([positions, branch_positions.flatten()])
        block = block.expand(rows, -1)
        positions = positions.unsqueeze(0).expand(rows, -1)

        kwargs = {}
        if two_rows:
            kwargs["attention_mask"] = self._block_mask(past, r, gamma, device, branches=branches)
            self.gate.select(slice(PREDICTIVE, PREDICTIVE + 1), 2, device)
        elif self.gate is not None:
            self.gate.select(slice(0, 0), 1, device)
        if self.encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = self.encoder_hidden_states.expand(rows, -1, -1)
        if branches:
            self.gate.control_reads = self._branch_reads(r, gamma, device)
        try:
            with attention_backends(device):
                hidden = self.decoder(
                    input_ids=block,
                    **cache_argument(self.decoder, self._cache),
                    position_ids=positions,
                    use_cache=True,
                    **kwargs,
                ).last_hidden_state
        finally:
            if branches:
                self.gate.control_reads = None
        self._block = block.shape[1]
        if self.observe_index is not None and past <= self.observe_index < past + r:
            at = self.observe_index - past
            self.observed_logits = project(hidden[CONTROL : CONTROL + 1, at : at + 1], self.lm_head, self.head_dtype)[0, 0]
        # only the last pending token and the drafts predict something we need
        logits = project(hidden[:, r - 1 : L], self.lm_head, self.head_dtype)
        token_index = torch.arange(past + r, past + r + gamma + 1, device=device)
        self._block_tokens = block[0, :L]
        self._tokens = self._tokens.to(device)
        sequence = torch.cat([self._tokens, self._block_tokens])
        logits = self.process_logits(logits, token_index, sequence)
        branch_logits = None
        if branches:  # the predictive row's placeholder nodes; each predicts the token after it
            placeholders = hidden[PREDICTIVE, L:].view(gamma + 1, gamma + 1, -1)[:, 1:]
            branch_logits = project(placeholders.reshape(1, (gamma + 1) * gamma, -1), self.lm_head)
            branch_logits = branch_logits.view(1, gamma + 1, gamma, -1)
            # branch n's prefix: the block up to its first node, then placeholders (tokens to come)
            for n in range(gamma + 1):
                prefix = torch.cat([sequence[: past + r + n], nodes[n, 1:]])
                branch_logits[:, n] = self.process_logits(branch_logits[:, n], branch_positions[n, 1:] + 1, prefix)
        return BlockOutput(
            control_logits=logits[CONTROL : CONTROL + 1],
            predictive_logits=logits[PREDICTIVE : PREDICTIVE + 1] if two_rows else None,
            branch_logits=branch_logits,
        )

    def _forward_rows(self, pending: torch.Tensor, drafts: torch.Tensor) -> BlockOutput:
        """`forward_block` for B > 1 sequences (no blank branches): rows [0, B) the control
        stream, [B, 2B) the predictive one. The block is written at the same cache slots in every
        row, each row at its own positions, reading its own live slots."""
        B, r, gamma = pending.shape[0], pending.shape[1], drafts.shape[1]
        streams = self._rows
        if gamma and streams != 2:
            raise ValueError("drafts given to a control-only model (drafting=False)")
        for length, pad in zip(self._lengths, self._pad):
            if length + r - pad + gamma > self.max_length:
                raise ValueError(f"block of {r - pad + gamma} tokens at {length} exceeds {self.max_length} positions")
        if self._cache is None:
            self._cache = self._new_cache()
        device = pending.device
        S, L = self._slots, r + gamma
        block = torch.cat([pending, drafts], dim=1)
        offsets = torch.tensor([length - pad for length, pad in zip(self._lengths, self._pad)], device=device)
        positions = (offsets[:, None] + torch.arange(L, device=device)).clamp_min(0)  # padding: never read
        allowed = torch.zeros(streams * B, L, S + L, dtype=torch.bool, device=device)
        live = self._live.to(device)
        patterns = [torch.tril(torch.ones(L, L, dtype=torch.bool, device=device))]
        if streams == 2:  # the predictive stream's pattern, as training builds it
            patterns.append(block_mask(0, 0, L, torch.float32, pending=r, device=device)[0, 0] == 0)
        for stream, pattern in enumerate(patterns):
            rows = slice(stream * B, (stream + 1) * B)
            allowed[rows, :, :S] = live[:, None, :]
            allowed[rows, :, S:] = pattern
            for row, pad in enumerate(self._pad):
                if pad:  # nobody reads the padding; each padding token reads itself (a softmax needs one)
                    allowed[stream * B + row, :, S : S + pad] = False
                    allowed[stream * B + row, torch.arange(pad), S + torch.arange(pad)] = True
        dtype = self.lm_head.weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        if streams == 2:
            self.gate.select(slice(B, 2 * B), 2 * B, device)
        elif self.gate is not None:
            self.gate.select(slice(0, 0), B, device)
        kwargs = {}
        if self.encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = self.encoder_hidden_states.expand(streams * B, -1, -1)
        with attention_backends(device):
            hidden = self.decoder(
                input_ids=block.repeat(streams, 1), **cache_argument(self.decoder, self._cache),
                position_ids=positions.repeat(streams, 1), attention_mask=mask.unsqueeze(1), use_cache=True, **kwargs,
            ).last_hidden_state
        self._block = L
        logits = project(hidden[:, r - 1 : L], self.lm_head, self.head_dtype).view(streams, B, gamma + 1, -1)
        self._block_tokens = [block[row, pad:] for row, pad in enumerate(self._pad)]
        for row in range(B):
            index = torch.arange(gamma + 1, device=device) + self._lengths[row] + r - self._pad[row]
            sequence = torch.cat([self._row_tokens[row].to(device), self._block_tokens[row]])
            logits[:, row] = self.process_logits(logits[:, row], index, sequence)
        return BlockOutput(control_logits=logits[CONTROL], predictive_logits=logits[PREDICTIVE] if streams == 2 else None)

    def _commit_rows(self, keeps: Sequence[int]) -> None:
        """`commit` for B > 1 sequences: the kept tokens become live in their row; the cache
        keeps the block up to the longest kept prefix (the rest of each row's block is dead)."""
        if len(keeps) != self.batch:
            raise ValueError(f"{len(keeps)} counts to keep for {self.batch} rows")
        S, L = self._slots, self._block
        new = torch.zeros(self.batch, L, dtype=torch.bool)
        for row, (count, pad) in enumerate(zip(keeps, self._pad)):
            if not 0 <= count <= L - pad:
                raise ValueError(f"cannot keep {count} of a {L - pad}-token block")
            new[row, pad : pad + count] = True
            self._lengths[row] += count
            self._row_tokens[row] = torch.cat([self._row_tokens[row], self._block_tokens[row][:count].cpu()])
        end = S + max(pad + count for pad, count in zip(self._pad, keeps))
        cache = getattr(self._cache, "self_attention_cache", self._cache)
        cache.crop(-(S + L - end))
        if self._rows == 2:  # the predictive rows read the control stream's prefix
            B = self.batch
            for layer in cache.layers:
                layer.keys[B:, :, S:end] = layer.keys[:B, :, S:end]
                layer.values[B:, :, S:end] = layer.values[:B, :, S:end]
        self._live = torch.cat([self._live, new[:, : end - S]], dim=1)
        self._slots, self._pad, self._block = end, [0] * self.batch, 0

    def _block_mask(self, past: int, r: int, gamma: int, device, *, branches: bool = False) -> torch.Tensor:
        """Additive mask [2, 1, T, past+T] over the block (r pending tokens, γ drafts) and, with
        `branches`, the γ+1 blank branches after it (T = r + γ + (γ+1)²): row 0 causal (its
        branch nodes are never read), row 1 the predictive stream's pattern (`block_mask`, the
        one training uses); through `_branch_reads` the branches also see the control row's
        tokens before their first node."""
        dtype = self.lm_head.weight.dtype
        predictive = block_mask(past, past, r + gamma, dtype, pending=r, branches=branches, device=device)
        T = predictive.shape[2]
        control = block_mask(past, past, T, dtype, pending=T, device=device)
        return torch.cat([control, predictive])  # rows CONTROL, PREDICTIVE

    def _branch_reads(self, r: int, gamma: int, device) -> torch.Tensor:
        """Additive mask [1, 1, T, L] of the predictive row's reads of the control row's block:
        branch n's nodes read the block's tokens before its first node (a commit of n drafts
        keeps them, and the predictive stream reads a committed prefix as the control stream
        computed it)."""
        L, size = r + gamma, gamma + 1
        allowed = torch.zeros(1, 1, L + (gamma + 1) * size, L, dtype=torch.bool, device=device)
        for n in range(gamma + 1):
            allowed[0, 0, L + n * size : L + (n + 1) * size, : r - 1 + n] = True
        mask = torch.zeros(allowed.shape, dtype=self.lm_head.weight.dtype, device=device)
        return mask.masked_fill_(~allowed, torch.finfo(mask.dtype).min)

    @torch.inference_mode()
    def commit(self, keep: Union[int, Sequence[int]]) -> None:
        """Keep the first `keep` tokens of the last block in the caches (0: drop the whole block);
        one count per sequence in a batch."""
        if self._batched:
            return self._commit_rows([keep] if isinstance(keep, int) else list(keep))
        if not isinstance(keep, int):
            (keep,) = keep
        if not 0 <= keep <= self._block:
            raise ValueError(f"cannot keep {keep} of a {self._block}-token block")
        start, self.length = self.length, self.length + keep
        self._tokens = torch.cat([self._tokens, self._block_tokens[:keep]])
        # Whisper's cache pairs self- and cross-attention caches; a text LM's is self-attention only
        cache = getattr(self._cache, "self_attention_cache", self._cache)
        # transformers 5 crops by a negative count of tokens to remove
        cache.crop(-(self._block - keep))
        if self._rows == 2:
            # the predictive row reads the control stream's prefix (see the module docstring)
            for layer in cache.layers:
                layer.keys[PREDICTIVE, :, start : self.length] = layer.keys[CONTROL, :, start : self.length]
                layer.values[PREDICTIVE, :, start : self.length] = layer.values[CONTROL, :, start : self.length]
        self._block = 0

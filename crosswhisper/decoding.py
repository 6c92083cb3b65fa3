"""The cross-regressive decoding loop (DESIGN §1.1) over any dual-stream model.

A model plugs in through `DualStreamModel`: Whisper (`dual_stream.py` + `whisper.py`) and
decoder-only text LMs implement it; this module imports neither transformers nor Whisper.

One iteration, for each row of the batch (`decode_batch`; `decode` is the batch of one):

    1. forward once over [pending committed tokens, d_1 … d_γ]:
         control stream → P_1 … P_{γ+1},  predictive stream → Q_1 … Q_{γ+1}
    2. accept the longest prefix d_1..d_n that passes the energy test (acceptance.py)
    3. commit d_1..d_n and one more token: the correction (n < γ) or the bonus (n = γ)
    4. refill the buffer with this pass's predictive samples for the slots after the commit
       (with blank branches: the samples of the branch made for exactly this outcome)
    5. let the model keep the committed prefix in its caches and drop the rest
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence, Union

import torch

from .acceptance import AcceptanceRule, DraftBuffer, repeats, verify_greedy, verify_sampled

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockOutput:
    control_logits: torch.Tensor  # [B, γ+1, V] processed logits P_1..P_{γ+1} (all masks applied)
    predictive_logits: Optional[torch.Tensor]  # [B, γ+1, V] processed Q_1..Q_{γ+1}; None when γ = 0
    # [B, γ+1, γ, V] processed predictive logits of the blank branches (`forward_block(branches=True)`):
    # branch n holds placeholders from slot n+1 on, after d_1..d_n, and predicts the γ tokens after
    # slot n+1, so it drafts for the next pass whatever the correction (or bonus) at n+1 is; None without
    branch_logits: Optional[torch.Tensor] = None


class DualStreamModel(Protocol):
    """What the loop needs from a model. Caches live in the model; the loop owns the tokens."""

    vocab_size: int  # size of the distributions returned
    max_length: int  # positions the model can hold (prompt + generated tokens)
    length: int  # committed tokens already in the caches

    def reset(self, batch: int, padding: Optional[Sequence[int]] = None) -> None:
        """Start `batch` new sequences: empty caches. `padding` (batch > 1): how many placeholder
        tokens each row's first block starts with (prompts of different lengths, left-padded);
        the model never attends to them."""

    def forward_block(self, pending: torch.Tensor, drafts: torch.Tensor, *, branches: bool = False) -> BlockOutput:
        """One call of both streams over [pending [B, r], drafts [B, γ]] (γ may be 0).

        The control stream attends causally; the predictive stream sees the committed
        prefix and attends bidirectionally inside the draft block. Logits at the positions of
        the last pending token and of every draft are returned, processed (suppressed
        tokens etc.) at their absolute positions, identically for both streams. `branches`:
        the predictive stream also computes the blank branches (`BlockOutput.branch_logits`)
        when the model supports them and they fit; otherwise they are None.
        """

    def commit(self, keep: Union[int, Sequence[int]]) -> None:
        """Keep the first `keep` tokens of the last block (pending + accepted drafts, padding not
        counted) in the caches (0: drop the whole block); with batch > 1, one count per row."""

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these rows of the batch, in this order (finished rows leave; batch > 1)."""


@dataclass(frozen=True)
class DecodeOptions:
    gamma: int = 16  # draft slots per forward call; 0 = plain autoregressive decoding
    beta: float = 0.0  # EMA factor of the energy test (0 = lossless)
    tau: float = 0.0  # energy floor, ≤ 0 (0 = lossless)
    temperature: float = 0.0  # 0 = greedy
    max_new_tokens: int = 224  # generated tokens at most (end-of-text included)
    refill: str = "fresh"  # "fresh": this pass's predictions; "carry": the paper's carried drafts
    # draft from blank branches: the next pass's drafts are made with a placeholder where this
    # pass's correction (or bonus) goes, not next to the rejected draft; (γ+1)² more tokens per
    # call. Replaces `refill` where the model computes them (HFDualStream does)
    blank_branches: bool = False
    # also return each generated token's log-probability under the control stream's processed,
    # untempered distribution (Whisper's avg_logprob for temperature fallback)
    token_logprobs: bool = False

    def __post_init__(self):
        if int(self.gamma) != self.gamma or self.gamma < 0:
            raise ValueError(f"gamma must be an integer ≥ 0, got {self.gamma}")
        if self.gamma:
            AcceptanceRule(beta=self.beta, tau=self.tau, gamma=self.gamma)  # validates β, τ
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.refill not in ("fresh", "carry"):
            raise ValueError(f"refill must be 'fresh' or 'carry', got {self.refill!r}")


@dataclass
class DecodeResult:
    tokens: list[int]  # generated tokens (prompt excluded), end-of-text included when produced
    forward_calls: int = 0
    accepted: Counter = field(default_factory=Counter)  # tokens committed per call → count
    token_logprobs: list[float] = field(default_factory=list)  # per token, with `DecodeOptions.token_logprobs`

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / self.forward_calls if self.forward_calls else 0.0


def _sample(logits: torch.Tensor, temperature: float, generator) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Tokens [K] from logits [K, V]: argmax (greedy; no softmax needed) or a sample of
    softmax(logits/T), returned with that distribution (the q̂ a draft must carry)."""
    if temperature == 0:
        return logits.argmax(dim=-1), None
    dist = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(dist, 1, generator=generator).squeeze(-1), dist


def decode(
    model: DualStreamModel,
    prompt: Sequence[int],
    *,
    options: DecodeOptions,
    eos_token_id: Union[int, Sequence[int]],
    placeholder_id: int,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> DecodeResult:
    """Decode one sequence after `prompt` by cross-regression (γ ≥ 1) or plain AR (γ = 0).

    With β = 0, τ = 0 the output is exactly what the control stream alone would produce:
    token-identical to greedy at T = 0, and distributed as ancestral sampling at T > 0.
    `eos_token_id`: the token, or tokens, that end the sequence (kept in the output).
    """
    return decode_batch(
        model, [prompt], options=options, eos_token_id=eos_token_id, placeholder_id=placeholder_id,
        generator=generator, device=device,
    )[0]


def decode_batch(
    model: DualStreamModel,
    prompts: Sequence[Sequence[int]],
    *,
    options: DecodeOptions,
    eos_token_id: Union[int, Sequence[int]],
    placeholder_id: int,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> list[DecodeResult]:
    """Decode B sequences at once (DESIGN §1.6), one result per prompt, in order.

    Every row is `decode` of its own prompt: it accepts its own prefix, commits its own number
    of tokens and stops on its own; a finished row leaves the batch (`model.select`). Prompts
    of different lengths are left-padded with `placeholder_id` in the first call
    (`model.reset(B, padding)`: the model masks the padding). Lossless greedy rows are
    token-identical to their batch-1 decode (up to the last bits of batched float
    arithmetic: see DESIGN §1.6); sampled rows keep their own distribution.
    """
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("decode_batch needs at least one prompt, none of them empty")
    stop_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    stop_tensor = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    gamma, sampling = options.gamma, options.temperature > 0
    rule = AcceptanceRule(beta=options.beta, tau=options.tau, gamma=gamma) if gamma else None
    # the lossy greedy test judges a draft by the distribution it was taken from, so keep that too
    proposals = gamma > 0 and (sampling or not rule.lossless)
    lossy = gamma > 0 and not rule.lossless
    batch = len(prompts)
    buffer = DraftBuffer.empty(batch, gamma, model.vocab_size, placeholder=placeholder_id, proposals=proposals, device=device)
    results = [DecodeResult(tokens=[]) for _ in prompts]
    # each row's budget: the options' and the positions its prompt leaves in the model
    budgets = [min(options.max_new_tokens, model.max_length - len(prompt)) for prompt in prompts]
    if min(budgets) < 1:
        raise ValueError(f"a prompt of {max(map(len, prompts))} tokens leaves no room in {model.max_length} positions")
    width = max(len(prompt) for prompt in prompts)
    padding = [width - len(prompt) for prompt in prompts]
    pending = torch.tensor([[placeholder_id] * pad + list(prompt) for pad, prompt in zip(padding, prompts)],
                           dtype=torch.long, device=device)
    pending_real = [len(prompt) for prompt in prompts]  # pending tokens of each row, padding excluded
    if batch == 1:
        model.reset(1)
    else:
        model.reset(batch, padding=padding)
    rows = list(range(batch))  # the prompt index of each row still in the batch

    while True:
        # near the model's length limit only the drafts that still fit are verified (the row
        # with the fewest positions left decides for the batch; exactness does not depend on γ)
        used = max(len(prompts[i]) + len(results[i].tokens) for i in rows)
        fit = min(gamma, model.max_length - used)
        drafts, valid = buffer.tokens[:, :fit], buffer.valid[:, :fit]
        # a stop token that a lossy rule lets through ends the sequence early and loses every
        # word after it, and a loosely accepted repeat can start a loop: lossy modes accept
        # those drafts only by the exact test
        exact_only = None
        if lossy and fit:
            exact_only = torch.isin(drafts, stop_tensor)
            for row, index in enumerate(rows):
                guard = repeats(results[index].tokens, drafts[row].tolist())
                exact_only[row] |= torch.tensor(guard, device=exact_only.device)
        out = model.forward_block(pending, drafts, branches=options.blank_branches)
        P_logits = out.control_logits.float()
        if P_logits.shape[-1] != model.vocab_size:
            raise ValueError(f"model returned {P_logits.shape[-1]} logits for a vocabulary of {model.vocab_size}")
        # Acceptance rule: commit d_1..d_n, the longest prefix of real drafts with ρ̂_k ≥ η_k
        # (lossless T > 0: U_k ≤ p_k / q̂_k(d_k); T = 0: d_k == argmax P_k), then one token
        # from P_{n+1} (minus q̂_{n+1} after a rejection).
        if fit == 0:
            n_all = torch.zeros(len(rows), dtype=torch.long)
            next_all = _sample(P_logits[:, 0], options.temperature, generator)[0]
        elif sampling:
            P = torch.softmax(P_logits / options.temperature, dim=-1)
            n_all, next_all = verify_sampled(P, drafts, buffer.q_hat[:, :fit], valid, rule, generator, exact_only)
        else:
            q_hat = None if rule.lossless else buffer.q_hat[:, :fit]
            n_all, next_all = verify_greedy(P_logits, drafts, valid, rule, q_hat, exact_only)
        n_all, next_all = n_all.tolist(), next_all.tolist()

        staying, keeps = [], []
        for row, index in enumerate(rows):
            result, n, next_token = results[index], n_all[row], next_all[row]
            result.forward_calls += 1
            new_tokens = buffer.tokens[row, :n].tolist() + [next_token]
            new_tokens = new_tokens[: budgets[index] - len(result.tokens)]
            stop = next((i for i, token in enumerate(new_tokens) if token in stop_ids), None)
            if stop is not None:
                new_tokens = new_tokens[: stop + 1]
            result.tokens += new_tokens
            result.accepted[len(new_tokens)] += 1
            if options.token_logprobs:  # P_j is the distribution the j-th committed token came from
                logprobs = torch.log_softmax(P_logits[row, : len(new_tokens)], dim=-1)
                result.token_logprobs += logprobs[torch.arange(len(new_tokens)), new_tokens].tolist()
            if stop is None and len(result.tokens) < budgets[index]:
                staying.append(row)
                keeps.append(pending_real[row] + n)
        if not staying:
            return results

        if len(staying) < len(rows):  # finished rows leave the batch
            model.select(staying)
            buffer.select(staying)
        model.commit(keeps[0] if batch == 1 else keeps)
        branch = out.branch_logits is not None
        # lossless greedy drafts are the predictive stream's argmax: every row's at once
        argmax = out.predictive_logits.argmax(dim=-1) if gamma and not (branch or sampling or proposals) else None
        for row, old in enumerate(staying):
            if gamma:
                # the blank branch after the n accepted drafts, else this pass's predictions after them
                n = n_all[old]
                logits = out.branch_logits[old, n] if branch else out.predictive_logits[old]
                if argmax is not None:
                    new_drafts, new_q = argmax[old], None
                else:
                    new_drafts, new_q = _sample(logits, options.temperature, generator)
                if new_q is None and proposals:  # lossy greedy: the T = 1 proposal of each argmax draft
                    new_q = torch.softmax(logits.float(), dim=-1)
                if branch:
                    buffer.fill(new_drafts, new_q, row=row)
                else:
                    buffer.refill(n, new_drafts, new_q, row=row, carry=options.refill == "carry")
        rows = [rows[row] for row in staying]
        pending = torch.tensor([[next_all[row]] for row in staying], dtype=torch.long, device=device)
        pending_real = [1] * len(rows)

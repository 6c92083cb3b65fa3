"""Model-agnostic acceptance core of Cross-Regression (DESIGN §1.1–1.2). Pure torch.

Every function works on a batch of rows (sequences) and γ draft slots:

    P            [B, γ+1, V]  control (target) distributions: P_k = P(· | x, d_<k), k = 1..γ+1
    drafts       [B, γ]       draft tokens d_k in the buffer (what the control stream saw)
    q_hat        [B, γ, V]    proposal distribution each draft was sampled from (cached)
    valid        [B, γ]       slot holds a real draft (False: placeholder, never accepted)

The test (Algorithm 2, with the threshold made consistent, DESIGN §1.2):

    E_k = log p_k − log q_k ;  ρ_k = β ρ_{k−1} + (1 − β) E_k ;  ρ̂_k = ρ_k / (1 − β^k)
    η_k = min(log U_k, τ √(k/γ)) ;  accept slot k iff ρ̂_k ≥ η_k, stopping at the first failure

With β = 0, τ = 0 this is speculative sampling (accept iff U_k ≤ p_k / q_k), exact in
distribution once a rejection is followed by a sample of norm(max(0, P − q̂)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# log-probabilities are clamped here so that log 0 = −inf never turns into NaN in the EMA
_LOG_FLOOR = -1e4


@dataclass(frozen=True)
class AcceptanceRule:
    beta: float = 0.0  # EMA factor β ∈ [0, 1): 0 = every position judged alone
    tau: float = 0.0  # energy floor τ ≤ 0: 0 = lossless, −∞ accepts everything
    gamma: int = 16  # draft horizon γ ≥ 1 (the τ√(k/γ) schedule's scale)

    def __post_init__(self):
        if not (0.0 <= self.beta < 1.0):
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")
        if not (self.tau <= 0.0) or math.isnan(self.tau):
            raise ValueError(f"tau must be ≤ 0 (0 = lossless), got {self.tau}")
        if int(self.gamma) != self.gamma or self.gamma < 1:
            raise ValueError(f"gamma must be an integer ≥ 1, got {self.gamma}")

    @property
    def lossless(self) -> bool:
        return self.beta == 0.0 and self.tau == 0.0


def energies(p_draft: torch.Tensor, q_draft: torch.Tensor) -> torch.Tensor:
    """E_k = log p_k − log q_k: how much more the target likes the draft than the proposal did."""
    return p_draft.clamp_min(0).log().clamp_min(_LOG_FLOOR) - q_draft.clamp_min(0).log().clamp_min(_LOG_FLOOR)


def smoothed_energies(energy: torch.Tensor, beta: float) -> torch.Tensor:
    """ρ̂_k: bias-corrected EMA of the energies over slots (last dim); β = 0 returns E itself.

    Lets a run of confident positions carry one doubtful position (lossy mode only).
    """
    if beta == 0.0:
        return energy
    rho = torch.zeros_like(energy[..., 0])
    out = torch.empty_like(energy)
    for k in range(energy.shape[-1]):
        rho = beta * rho + (1.0 - beta) * energy[..., k]
        out[..., k] = rho / (1.0 - beta ** (k + 1))
    return out


def thresholds(log_u: torch.Tensor, tau: float, gamma: int) -> torch.Tensor:
    """η_k = min(log U_k, τ √(k/γ)) for k = 1..K (last dim).

    `min`, not the paper's `max`: with τ ≤ 0, `max` would make the lossy test stricter than the
    lossless one, contradicting the paper's own limits (τ = 0 lossless, τ → −∞ accept all).
    """
    if tau == 0.0:
        return log_u
    k = torch.arange(1, log_u.shape[-1] + 1, device=log_u.device, dtype=log_u.dtype)
    return torch.minimum(log_u, tau * torch.sqrt(k / gamma))


def accepted_prefix(passed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """n per row: the number of leading slots that passed and hold a real draft."""
    ok = (passed & valid).to(torch.int64)
    return ok.cumprod(dim=-1).sum(dim=-1)


def residual(P: torch.Tensor, q_hat: torch.Tensor) -> torch.Tensor:
    """norm(max(0, P − q̂)); rows whose residual mass is 0 (q̂ covers P) fall back to P itself."""
    mass = (P - q_hat).clamp_min(0)
    total = mass.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, mass / total.clamp_min(torch.finfo(P.dtype).tiny), P)


def check_shapes(P: torch.Tensor, drafts: torch.Tensor, valid: torch.Tensor, q_hat: Optional[torch.Tensor] = None):
    """Refuse inconsistent inputs loudly: a silent broadcast here would break exactness."""
    if drafts.dim() != 2 or P.dim() != 3:
        raise ValueError(f"expected P [B, γ+1, V] and drafts [B, γ], got {tuple(P.shape)} and {tuple(drafts.shape)}")
    B, gamma = drafts.shape
    if P.shape[:2] != (B, gamma + 1):
        raise ValueError(f"P must be [B={B}, γ+1={gamma + 1}, V], got {tuple(P.shape)}")
    if valid.shape != drafts.shape:
        raise ValueError(f"valid must be {tuple(drafts.shape)}, got {tuple(valid.shape)}")
    if q_hat is not None and q_hat.shape != (B, gamma, P.shape[2]):
        raise ValueError(
            f"q_hat must be [B, γ, V] = {(B, gamma, P.shape[2])}, got {tuple(q_hat.shape)} (vocabulary mismatch?)"
        )


def _gather(dist: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return dist.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def verify_sampled(
    P: torch.Tensor,
    drafts: torch.Tensor,
    q_hat: torch.Tensor,
    valid: torch.Tensor,
    rule: AcceptanceRule,
    generator: Optional[torch.Generator] = None,
    exact_only: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling verification (T > 0). Returns (n [B], next_token [B]).

    The next token is the correction x_c ~ norm(max(0, P_{n+1} − q̂_{n+1})) after a rejection,
    or the bonus x ~ P_{γ+1} when all γ drafts were accepted. A slot without a draft is
    treated as a rejection whose proposal put no mass anywhere, so x_c ~ P_{n+1}.
    `exact_only` [B, γ] marks drafts the lossy rule may not accept (end-of-sequence tokens,
    repeats: `repeats`): they pass only the lossless test U_k ≤ p_k / q_k.
    """
    check_shapes(P, drafts, valid, q_hat)
    B, gamma = drafts.shape
    p_draft = _gather(P[:, :gamma], drafts)
    q_draft = _gather(q_hat, drafts)
    log_u = torch.rand((B, gamma), generator=generator, device=P.device, dtype=P.dtype).log()
    energy = energies(p_draft, q_draft)
    passed = smoothed_energies(energy, rule.beta) >= thresholds(log_u, rule.tau, rule.gamma)
    if exact_only is not None:  # (a no-op when lossless: that test is energy ≥ log U already)
        passed = torch.where(exact_only, energy >= log_u, passed)
    n = accepted_prefix(passed, valid)

    rows = torch.arange(B, device=P.device)
    P_next = P[rows, n]  # P_{n+1} (index n, 0-based): the distribution after the accepted prefix
    slot = n.clamp_max(gamma - 1)
    q_next = torch.where(((n < gamma) & valid[rows, slot]).unsqueeze(-1), q_hat[rows, slot], torch.zeros_like(P_next))
    # after a full acceptance (n = γ) q_next is zero, so the residual is P_{γ+1}: the bonus token
    next_token = torch.multinomial(residual(P_next, q_next), 1, generator=generator).squeeze(-1)
    return n, next_token


def verify_greedy(
    P_logits: torch.Tensor,
    drafts: torch.Tensor,
    valid: torch.Tensor,
    rule: AcceptanceRule,
    q_hat: Optional[torch.Tensor] = None,
    exact_only: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification (T = 0). Returns (n [B], next_token [B]).

    The target is one-hot at argmax P_k, so lossless acceptance is d_k == argmax P_k and the
    output is token-identical to greedy decoding; the next token is argmax P_{n+1}.
    Lossy (β > 0 or τ < 0) also accepts a slot whose smoothed energy, from the untempered
    (T = 1) distributions, stays above τ√(k/γ) (U fixed at 1: deterministic). Its q_k is
    q̂_k(d_k), the cached proposal the draft was taken from (`q_hat` [B, γ, V], lossy only): a
    later pass's Q_k would give E ≈ 0 to a draft that neither stream wants any more.
    `exact_only` [B, γ] marks drafts the lossy rule may not accept (end-of-sequence tokens,
    repeats: `repeats`): they pass only as argmax P_k.
    """
    check_shapes(P_logits, drafts, valid, q_hat if not rule.lossless else None)
    B, gamma = drafts.shape
    target = P_logits.argmax(dim=-1)  # [B, γ+1]
    passed = drafts == target[:, :gamma]
    if not rule.lossless:
        if q_hat is None:
            raise ValueError("lossy greedy verification needs the drafts' proposals q_hat")
        p_draft = _gather(P_logits[:, :gamma].log_softmax(-1), drafts).exp()
        q_draft = _gather(q_hat, drafts)
        rho_hat = smoothed_energies(energies(p_draft, q_draft), rule.beta)
        eta = thresholds(torch.zeros_like(rho_hat), rule.tau, rule.gamma)
        loose = rho_hat >= eta
        if exact_only is not None:
            loose = loose & ~exact_only
        passed = passed | loose
    n = accepted_prefix(passed, valid)
    rows = torch.arange(B, device=P_logits.device)
    return n, target[rows, n]


def repeats(history: list[int], drafts: list[int], max_period: int = 16) -> list[bool]:
    """Per draft slot k: whether history + d_1..d_k ends in one span twice in a row (a period
    of 1..`max_period` tokens). A lossy rule must not accept such a draft: a loop ("Knit 1.
    Knit 1. …") starts as one loosely accepted repeat, and then feeds itself. Lossless
    decoding never asks (the control's own repeats stand)."""
    flags, sequence = [], list(history[-2 * max_period :])  # (an older token cannot be in a span)
    for draft in drafts:
        sequence.append(draft)
        end = len(sequence)
        flags.append(any(
            sequence[end - period :] == sequence[end - 2 * period : end - period]
            for period in range(1, min(max_period, end // 2) + 1)
        ))
    return flags


@dataclass
class DraftBuffer:
    """Fixed-length draft buffer (γ slots) of every row, with the proposal each draft came from.

    Fixed shapes keep every forward call the same size (batched, GPU-friendly). `q_hat` is
    cached when a draft is sampled and never recomputed (Appendix C): exactness needs the
    very distribution the draft was drawn from. Lossless greedy decoding keeps no q_hat; lossy
    greedy keeps the T = 1 distribution each argmax draft was taken from (its energies need it).
    """

    tokens: torch.Tensor  # [B, γ] draft ids; placeholder id in empty slots
    valid: torch.Tensor  # [B, γ] bool: slot holds a draft sampled from q_hat
    q_hat: Optional[torch.Tensor]  # [B, γ, V] proposals (sampling, lossy greedy) or None (lossless greedy)
    placeholder: int  # id fed to the model in empty slots
    carried: int = 0  # drafts carried over from earlier passes (statistics)

    @classmethod
    def empty(cls, batch: int, gamma: int, vocab: int, *, placeholder: int, proposals: bool, device=None):
        """An empty buffer; `proposals`: keep q_hat (sampling, lossy greedy)."""
        return cls(
            tokens=torch.full((batch, gamma), placeholder, dtype=torch.long, device=device),
            valid=torch.zeros((batch, gamma), dtype=torch.bool, device=device),
            q_hat=torch.zeros((batch, gamma, vocab), device=device) if proposals else None,
            placeholder=placeholder,
        )

    @property
    def gamma(self) -> int:
        return self.tokens.shape[1]

    def select(self, rows) -> None:
        """Keep only these rows, in this order (finished sequences leave a batch)."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.tokens.device)
        self.tokens, self.valid = self.tokens[index], self.valid[index]
        if self.q_hat is not None:
            self.q_hat = self.q_hat[index]

    def fill(self, new_tokens: torch.Tensor, new_q: Optional[torch.Tensor], *, row: int = 0) -> None:
        """Replace row `row` by fresh drafts for slots 1..m (`new_tokens` [m], `new_q` [m, V]);
        the slots after m stay empty."""
        m = new_tokens.shape[0]
        self.tokens[row] = self.placeholder
        self.valid[row] = False
        self.tokens[row, :m] = new_tokens
        self.valid[row, :m] = True
        if self.q_hat is not None:
            self.q_hat[row] = 0.0
            self.q_hat[row, :m] = new_q

    def refill(
        self,
        n: int,
        new_tokens: torch.Tensor,
        new_q: Optional[torch.Tensor],
        *,
        row: int = 0,
        carry: bool = False,
    ) -> None:
        """Shift row `row` after committing n drafts + 1 correction/bonus token.

        `new_tokens` [m+1] (and `new_q` [m+1, V]) are this pass's predictive samples for
        slots 1..m+1 of the old buffer (m = γ except at the model's length limit). Old slot j becomes new slot j − (n + 1). New slots
        1..γ−n are taken from this pass (fresh, default) or, with `carry`, from the old
        unverified drafts d_{n+2..γ} with their cached q̂ (the paper) and slot γ+1 from this
        pass. The last n new slots have no prediction yet: placeholders until the next pass.
        """
        m = new_tokens.shape[0] - 1  # slots verified in this pass (γ, or fewer at the length limit)
        keep = m - n  # new slots 1..keep come from old slots n+2..m+1
        tokens = torch.full_like(self.tokens[row], self.placeholder)
        valid = torch.zeros_like(self.valid[row])
        q = torch.zeros_like(self.q_hat[row]) if self.q_hat is not None else None
        if keep > 0:
            tokens[:keep] = new_tokens[n + 1 : m + 1]
            valid[:keep] = True
            if q is not None:
                q[:keep] = new_q[n + 1 : m + 1]
            if carry and keep > 1:
                # old drafts d_{n+2..m} keep their place in the sequence and their cached q̂
                carried_valid = self.valid[row, n + 1 : m]
                tokens[: keep - 1] = torch.where(carried_valid, self.tokens[row, n + 1 : m], tokens[: keep - 1])
                if q is not None:
                    q[: keep - 1] = torch.where(carried_valid.unsqueeze(-1), self.q_hat[row, n + 1 : m], q[: keep - 1])
                self.carried += int(carried_valid.sum())
        self.tokens[row] = tokens
        self.valid[row] = valid
        if q is not None:
            self.q_hat[row] = q

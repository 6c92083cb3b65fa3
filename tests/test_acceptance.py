"""The acceptance core and the decoding loop alone, on a model whose distributions are known.

The toy model is a Markov chain: the control stream's P(· | x, d_<k) depends on the last
token only, so the exact distribution of every sequence can be enumerated. Its predictive
stream is deliberately bad and depends on the *next* draft too (like bidirectional attention),
so proposals are correlated with rejected drafts, corrections and carried-over slots.
"""

import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

from crosswhisper.acceptance import (
    AcceptanceRule,
    accepted_prefix,
    repeats,
    residual,
    smoothed_energies,
    thresholds,
    verify_greedy,
    verify_sampled,
)
from crosswhisper.decoding import BlockOutput, DecodeOptions, decode

V = 4
PROMPT = [2]
LENGTH = 3


@pytest.fixture(autouse=True)
def one_thread():
    # the toy model's ops are tiny: a second OpenMP thread only adds synchronisation
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MarkovStreams:
    """DualStreamModel with tabulated distributions; `commit` only tracks lengths."""

    def __init__(self, seed: int, max_length: int = 100):
        g = torch.Generator().manual_seed(seed)
        self.log_P = torch.randn(V, V, generator=g).mul(1.5).log_softmax(-1)  # [last token] → next
        self.log_Q = torch.randn(V, V + 1, V, generator=g).mul(2.0).log_softmax(-1)  # [token, next token]
        self.vocab_size = V
        self.max_length = max_length
        self.length = 0
        self._block = 0

    def reset(self, batch):
        self.length = self._block = 0

    def forward_block(self, pending, drafts, *, branches=False):
        block = torch.cat([pending, drafts], dim=1)[0]
        self._block = block.numel()
        inputs = block[pending.shape[1] - 1 :]
        following = torch.cat([inputs[1:], torch.tensor([V])])  # V = "nothing follows"
        return BlockOutput(
            control_logits=self.log_P[inputs].unsqueeze(0).clone(),
            predictive_logits=self.log_Q[inputs, following].unsqueeze(0).clone(),
        )

    def commit(self, keep):
        assert 0 < keep <= self._block
        self.length += keep


def exact_distribution(log_P: torch.Tensor, temperature: float) -> dict:
    P = torch.softmax(log_P / temperature, dim=-1)
    probs = {}
    for seq in itertools.product(range(V), repeat=LENGTH):
        p, last = 1.0, PROMPT[-1]
        for tok in seq:
            p *= float(P[last, tok])
            last = tok
        probs[seq] = p
    return probs


def sample_counts(model, options, n_samples, seed):
    g = torch.Generator().manual_seed(seed)
    counts, calls = {}, 0
    for _ in range(n_samples):
        # placeholder 0 is a real token: an accepted placeholder would show up as bias
        out = decode(model, PROMPT, options=options, eos_token_id=-1, placeholder_id=0, generator=g)
        calls += out.forward_calls
        counts[tuple(out.tokens)] = counts.get(tuple(out.tokens), 0) + 1
    return counts, n_samples * LENGTH / calls


def chi_square_pvalue(counts: dict, probs: dict, n: int) -> float:
    keys = sorted(probs)
    observed = [counts.get(k, 0) for k in keys]
    assert sum(observed) == n, "a sequence outside the support was produced"
    total = sum(probs.values())
    expected = [probs[k] / total * n for k in keys]
    return chisquare(observed, expected).pvalue


@pytest.mark.parametrize(
    "gamma,temperature,refill",
    # statistical, ~5 s each: one case in the quick run, the others slow
    [pytest.param(1, 1.0, "fresh", marks=pytest.mark.slow), (3, 1.0, "fresh"),
     pytest.param(3, 1.0, "carry", marks=pytest.mark.slow), pytest.param(2, 0.7, "carry", marks=pytest.mark.slow)],
)
def test_lossless_sampling_reproduces_the_control_distribution(gamma, temperature, refill):
    model = MarkovStreams(seed=gamma)
    options = DecodeOptions(gamma=gamma, temperature=temperature, max_new_tokens=LENGTH, refill=refill)
    n = 6000
    counts, _ = sample_counts(model, options, n, seed=123)
    p = chi_square_pvalue(counts, exact_distribution(model.log_P, temperature), n)
    assert p > 1e-3, f"cross-regressive samples deviate from the control distribution (p = {p:.2e})"


def test_the_statistical_test_detects_a_wrong_acceptance_rule(monkeypatch):
    """The chi-square test above must be able to fail: accept every draft (τ → −∞) and it does."""
    model = MarkovStreams(seed=3)
    options = DecodeOptions(gamma=3, temperature=1.0, tau=-1e9, max_new_tokens=LENGTH)
    counts, tpf = sample_counts(model, options, 4000, seed=1)
    assert chi_square_pvalue(counts, exact_distribution(model.log_P, 1.0), 4000) < 1e-6
    assert tpf > 1.4  # and it does accept more


def test_carry_refill_really_carries_drafts():
    model = MarkovStreams(seed=5)
    from crosswhisper.acceptance import DraftBuffer

    buffer = DraftBuffer.empty(1, 4, V, placeholder=0, proposals=True)
    buffer.tokens[0] = torch.tensor([1, 2, 3, 1])
    buffer.valid[0] = True
    buffer.q_hat[0] = torch.full((4, V), 1.0 / V)
    new = torch.tensor([3, 3, 3, 3, 3])
    buffer.refill(1, new, torch.full((5, V), 0.5), carry=True)  # commit d_1 + correction
    # old d_3, d_4 move to slots 1, 2; slot 3 (old γ+1) is this pass's; slot 4 has no prediction yet
    assert buffer.tokens[0].tolist() == [3, 1, 3, 0]
    assert buffer.valid[0].tolist() == [True, True, True, False]
    assert torch.allclose(buffer.q_hat[0, 0], torch.full((V,), 1.0 / V))
    assert buffer.carried == 2
    del model


def test_greedy_lossless_equals_plain_greedy():
    for seed in range(5):
        model = MarkovStreams(seed=seed)
        plain = decode(model, PROMPT, options=DecodeOptions(gamma=0, max_new_tokens=12), eos_token_id=-1, placeholder_id=0)
        for gamma in (1, 4, 16):
            fast = decode(
                model, PROMPT, options=DecodeOptions(gamma=gamma, max_new_tokens=12), eos_token_id=-1, placeholder_id=0
            )
            assert fast.tokens == plain.tokens
            assert fast.forward_calls <= plain.forward_calls


def test_length_limit_verifies_only_the_drafts_that_fit():
    model = MarkovStreams(seed=0, max_length=len(PROMPT) + 5)
    plain = decode(model, PROMPT, options=DecodeOptions(gamma=0, max_new_tokens=5), eos_token_id=-1, placeholder_id=0)
    fast = decode(model, PROMPT, options=DecodeOptions(gamma=16, max_new_tokens=5), eos_token_id=-1, placeholder_id=0)
    assert fast.tokens == plain.tokens and len(fast.tokens) == 5


def test_thresholds_use_min_so_lossy_is_looser_than_lossless():
    log_u = torch.log(torch.tensor([[0.9, 0.5, 0.999, 0.1]]))
    eta = thresholds(log_u, tau=-8.0, gamma=4)
    assert torch.all(eta <= log_u)  # lossy never stricter than lossless
    k = torch.arange(1, 5)
    assert torch.allclose(eta, torch.minimum(log_u, -8.0 * torch.sqrt(k / 4.0)))
    assert torch.equal(thresholds(log_u, tau=0.0, gamma=4), log_u)


def test_smoothed_energies_bias_correction():
    E = torch.full((2, 5), -0.7)
    assert torch.allclose(smoothed_energies(E, beta=0.5), E)  # constant energy stays itself
    E = torch.tensor([[-10.0, 1.0, 1.0]])
    rho = smoothed_energies(E, beta=0.5)
    assert math.isclose(rho[0, 0].item(), -10.0)
    assert math.isclose(rho[0, 1].item(), (0.5 * -5.0 + 0.5) / 0.75, rel_tol=1e-6)


def test_accepted_prefix_stops_at_first_failure_or_invalid_slot():
    passed = torch.tensor([[True, True, False, True], [True, True, True, True]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    assert accepted_prefix(passed, valid).tolist() == [2, 3]


def test_residual_and_its_fallback():
    P = torch.tensor([[0.5, 0.3, 0.2]])
    assert torch.allclose(residual(P, torch.tensor([[0.2, 0.3, 0.5]])), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(residual(P, P.clone()), P)  # zero mass: sample from P


def test_verify_sampled_bonus_token_after_full_acceptance():
    P = torch.zeros(1, 3, V)
    P[0, :, 1] = 1.0  # the target always wants token 1
    P[0, 2] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    drafts = torch.tensor([[1, 1]])
    q = torch.zeros(1, 2, V)
    q[..., 1] = 1.0
    n, nxt = verify_sampled(P, drafts, q, torch.ones(1, 2, dtype=torch.bool), AcceptanceRule(gamma=2))
    assert n.item() == 2 and nxt.item() == 3


def test_greedy_lossy_accepts_at_least_what_lossless_accepts():
    g = torch.Generator().manual_seed(0)
    P, Q = torch.randn(3, 9, 11, generator=g), torch.randn(3, 8, 11, generator=g)
    drafts = Q.argmax(-1)
    drafts[:, :2] = P[:, :2].argmax(-1)
    valid = torch.ones_like(drafts, dtype=torch.bool)
    n0, _ = verify_greedy(P, drafts, valid, AcceptanceRule(gamma=8))
    n1, _ = verify_greedy(P, drafts, valid, AcceptanceRule(gamma=8, tau=-8.0), Q.softmax(-1))
    assert torch.all(n0 >= 2) and torch.all(n1 >= n0)


def test_lossy_rules_accept_a_stop_token_only_by_the_exact_test():
    # a loose rule that lets a drafted end-of-text through cuts the sequence short for good
    rule = AcceptanceRule(gamma=2, tau=-8.0)  # accepts drafts the target finds 25× too unlikely
    P = torch.full((1, 3, V), 0.01)
    P[0, :, 1] = 0.97  # the target hardly ever ends here
    drafts, valid = torch.tensor([[3, 1]]), torch.ones(1, 2, dtype=torch.bool)
    stop = drafts == 3
    q = torch.full((1, 2, V), 1.0 / V)
    assert verify_greedy(P.log(), drafts, valid, rule, q)[0].item() == 2
    assert verify_greedy(P.log(), drafts, valid, rule, q, stop)[0].item() == 0
    # sampled: the exact test passes the stop draft with chance p/q = 4 %; this seed draws above
    assert verify_sampled(P, drafts, q, valid, rule, torch.Generator().manual_seed(0))[0].item() == 2
    assert verify_sampled(P, drafts, q, valid, rule, torch.Generator().manual_seed(0), stop)[0].item() == 0
    P[0, 0] = torch.tensor([0.01, 0.01, 0.01, 0.97])  # now the target ends: the stop draft is exact
    assert verify_greedy(P.log(), drafts, valid, rule, q, stop)[0].item() == 2


def test_lossy_decoding_ends_only_where_the_control_stream_ends():
    stop, ends = 3, 0
    for seed in range(30):
        model = MarkovStreams(seed)
        out = decode(
            model, PROMPT, options=DecodeOptions(gamma=3, tau=-1e4, max_new_tokens=12), eos_token_id=stop, placeholder_id=0
        )
        sequence = PROMPT + out.tokens
        for last, token in zip(sequence[:-1], sequence[1:]):
            if token == stop:  # a stop token is committed only as the control stream's argmax
                ends += 1
                assert model.log_P[last].argmax().item() == stop, seed
    assert ends > 0


@pytest.mark.parametrize(
    "kwargs", [dict(beta=1.0), dict(beta=-0.1), dict(tau=0.5), dict(gamma=-1), dict(temperature=-1.0), dict(refill="x")]
)
def test_invalid_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        DecodeOptions(**kwargs)


def test_wrong_shapes_are_refused():
    P = torch.randn(1, 5, V).softmax(-1)
    drafts = torch.zeros(1, 3, dtype=torch.long)
    valid = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="P must be"):
        verify_sampled(P, drafts, torch.rand(1, 3, V), valid, AcceptanceRule(gamma=3))
    with pytest.raises(ValueError, match="vocabulary"):
        verify_sampled(P[:, :4], drafts, torch.rand(1, 3, V + 1), valid, AcceptanceRule(gamma=3))


def test_repeats_flags_a_draft_that_completes_a_span_twice_in_a_row():
    knit = [11, 12, 13]  # "Knit 1."
    assert repeats(knit, knit) == [False, False, True]
    assert repeats([5, 6, 7], [8, 9, 10]) == [False, False, False]
    assert repeats([5, 6], [6]) == [True]  # "had had": a lossy rule leaves it to the exact test
    assert repeats([], [4]) == [False]
    long = list(range(20))
    assert repeats(long, long[:16]) == [False] * 16  # a period over 16 tokens is not looked for

"""The statistical test of lossless sampling, shared by the Whisper and text-LM tests.

A toy model with an enumerable sequence space: its exact sequence probabilities come from
teacher forcing; cross-regressive samples (a fixed seed) must match them by a chi-square test.
"""

import itertools
from typing import Callable

import torch
from scipy.stats import chisquare

V, LENGTH, START = 5, 3, 0  # vocabulary, generated tokens, the first (prompt) token
SEQUENCES = list(itertools.product(range(V), repeat=LENGTH))


def teacher_forcing_inputs() -> torch.Tensor:
    """[V**LENGTH, LENGTH] inputs [START, s_1 .. s_{LENGTH-1}] of every sequence."""
    return torch.tensor([[START, *seq[:-1]] for seq in SEQUENCES])


def sequence_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Exact P(sequence) from teacher-forced logits [V**LENGTH, LENGTH, V]."""
    logp = logits.log_softmax(-1).gather(-1, torch.tensor(SEQUENCES).unsqueeze(-1)).squeeze(-1).sum(-1)
    exact = logp.exp().double()
    return exact / exact.sum()


def assert_samples_follow(exact: torch.Tensor, sample: Callable[[], tuple[list[int], int]], n: int = 2000) -> None:
    """Draw n sequences with `sample()` → (tokens, forward calls); chi-square against `exact`."""
    counts = torch.zeros(len(SEQUENCES))
    calls = 0
    for _ in range(n):
        tokens, forward_calls = sample()
        counts[SEQUENCES.index(tuple(tokens))] += 1
        calls += forward_calls
    assert calls < n * LENGTH  # drafts were accepted at all: the test exercises acceptance
    expected = exact * n
    big = expected >= 5  # merge rare sequences into one bin for the chi-square approximation
    observed = torch.cat([counts[big], counts[~big].sum().view(1)]).numpy()
    expected = torch.cat([expected[big], expected[~big].sum().view(1)]).numpy()
    p = chisquare(observed, expected).pvalue
    assert p > 1e-3, f"cross-regressive sampling deviates from ancestral sampling (p = {p:.2e})"

"""Word error rate as openai-whisper and the Open ASR Leaderboard compute it.

Whisper's EnglishTextNormalizer (with its English spelling map; PyPI `whisper-normalizer`)
on both sides, then jiwer's corpus-level WER.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence


@lru_cache(maxsize=1)
def _normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize_text(text: str) -> str:
    return _normalizer()(text)


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER (total edits / total reference words) after Whisper's English normalisation."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [(normalize_text(r), normalize_text(h)) for r, h in zip(references, hypotheses)]
    pairs = [(r, h) for r, h in pairs if r.strip()]  # jiwer refuses empty references
    if not pairs:
        raise ValueError("no non-empty reference to score")
    return jiwer.wer([r for r, _ in pairs], [h for _, h in pairs])

"""Typed results: what `transcribe()` returns (segments, the transcript) and the decoding
counters that `transcribe()` and `lm.generate()` report alike."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping


@dataclass(frozen=True)
class DecodingStats:
    """Counters and timings of one `transcribe()` or `lm.generate()` call (all windows/rows)."""

    forward_calls: int  # decoder forward calls (one per token for plain greedy)
    generated_tokens: int  # tokens produced after the prompt, end-of-text included
    tokens_per_forward: float  # generated_tokens / forward_calls (the paper's "speedup" τ)
    encode_seconds: float  # wall time in the audio encoder and features (0 for a text LM)
    decode_seconds: float  # wall time spent decoding tokens (a text LM's prompt prefill included)
    acceptance_histogram: tuple[int, ...] = ()  # [i] = passes that committed i + 1 tokens

    @classmethod
    def from_counts(
        cls, *, forward_calls: int, generated_tokens: int, accepted: Mapping[int, int],
        encode_seconds: float = 0.0, decode_seconds: float = 0.0,
    ) -> "DecodingStats":
        """Stats from the loop's counters; `accepted` maps tokens committed per call → calls."""
        longest = max(accepted, default=0)
        return cls(
            forward_calls=forward_calls,
            generated_tokens=generated_tokens,
            tokens_per_forward=generated_tokens / forward_calls if forward_calls else 0.0,
            encode_seconds=encode_seconds,
            decode_seconds=decode_seconds,
            acceptance_histogram=tuple(accepted.get(i, 0) for i in range(1, longest + 1)),
        )


class StatsCounter:
    """Accumulates the counters of several decodes (one per window) into one `DecodingStats`."""

    def __init__(self) -> None:
        self.forward_calls = self.generated_tokens = 0
        self.accepted: Counter = Counter()
        self.encode_seconds = self.decode_seconds = 0.0

    def add(self, *, tokens: int, forward_calls: int, accepted: Iterable | Mapping[int, int]) -> None:
        self.generated_tokens += tokens
        self.forward_calls += forward_calls
        self.accepted.update(accepted)

    def stats(self) -> DecodingStats:
        return DecodingStats.from_counts(
            forward_calls=self.forward_calls, generated_tokens=self.generated_tokens, accepted=self.accepted,
            encode_seconds=self.encode_seconds, decode_seconds=self.decode_seconds,
        )


@dataclass(frozen=True)
class Word:
    start: float  # seconds from the start of the audio
    end: float  # seconds
    word: str  # the word as decoded, leading space and attached punctuation included
    probability: float  # mean probability of its tokens under the model


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the audio (its opening timestamp)
    end: float  # seconds (its closing timestamp; a window's end without timestamps)
    text: str  # the segment's text, stripped
    tokens: tuple[int, ...]  # its token ids, timestamp tokens included (no prompt, no end-of-text)
    avg_logprob: float = 0.0  # average log-probability of the window decode it came from
    compression_ratio: float = 0.0  # of that window's tokens (too repetitive above the threshold)
    no_speech_prob: float = 0.0  # P(<|nospeech|>) of that window
    temperature: float = 0.0  # the temperature that window was finally decoded at
    words: tuple[Word, ...] = ()  # with word_timestamps=True: its words and their times


@dataclass(frozen=True)
class Transcription:
    text: str  # the whole transcript
    tokens: tuple[int, ...]  # every segment's tokens, in order (timestamps included, no prompts)
    language: str  # language code, e.g. "en" (detected once for multilingual models unless given)
    segments: tuple[Segment, ...]  # cut at timestamp pairs (one per window without timestamps)
    duration: float  # audio length in seconds
    stats: DecodingStats = field(repr=False)  # counters and timings over every decode attempt
    windows: int = 0  # 30 s windows decoded (fallback re-decodes not counted)
    skipped: int = 0  # windows skipped as silence by the no-speech rule

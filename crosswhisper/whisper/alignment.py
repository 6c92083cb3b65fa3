"""Word timestamps from the cross-attention of the alignment heads (openai-whisper's `timing.py`
rules, on the same numbers): teacher-force a window's text, take the heads the model's
generation config names (`alignment_heads`), normalise and median-filter their attention over
the audio frames, align tokens to frames by dynamic time warping, group tokens into words and
attach punctuation, then clamp implausibly long words at segment and sentence boundaries.

The median filter, the dynamic time warping and the grouping of tokens into words are
transformers' own (`models/whisper/generation_whisper.py`, `tokenization_whisper.py`), the
ones its pipeline runs for `return_timestamps="word"`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..results import Word
from .loading import WhisperBundle
from .streams import WhisperStreams

TOKENS_PER_SECOND = 50  # encoder positions per second of audio (20 ms each)
MEDIAN_FILTER_WIDTH = 7
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"


def alignment_heads(bundle: WhisperBundle) -> dict[int, list[int]]:
    """{decoder layer: [heads]} of the model's alignment heads (generation config)."""
    pairs = bundle.settings.alignment_heads
    if not pairs:
        raise ValueError(f"{bundle.name}: its generation config names no alignment_heads (needed for word timestamps)")
    heads: dict[int, list[int]] = {}
    for layer, head in pairs:
        heads.setdefault(int(layer), []).append(int(head))
    return heads


@dataclass
class _Timing:
    word: str
    tokens: list[int]
    start: float  # seconds from the window's start
    end: float
    probability: float


def _find_alignment(bundle: WhisperBundle, hidden: torch.Tensor, sot_sequence: list[int],
                    text_tokens: list[int], num_frames: int, language: str) -> list[_Timing]:
    from transformers.models.whisper.generation_whisper import _dynamic_time_warping, _median_filter
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, _combine_tokens_into_words

    if not text_tokens:
        return []
    ids = bundle.settings
    eot = ids.eos_token_id
    heads = alignment_heads(bundle)
    model = bundle.weights
    streams = WhisperStreams(model.decoder, model.proj_out, hidden, process_logits=None, drafting=False,
                             max_length=model.config.max_target_positions, head_dtype=bundle.head_dtype)
    # <|startoftranscript|> [lang task] <|notimestamps|> text <|endoftext|>, as openai-whisper aligns
    tokens = [*sot_sequence, ids.no_timestamps_token_id, *text_tokens, eot]
    logits = streams.teacher_force(tokens, heads)
    probs = logits[len(sot_sequence) : len(sot_sequence) + len(text_tokens), :eot].float().softmax(-1)
    text_probs = probs[torch.arange(len(text_tokens)), torch.tensor(text_tokens)].tolist()

    weights = torch.cat([streams.captured[layer] for layer in sorted(heads)])  # [heads, T, frames]
    weights = weights[:, :, : num_frames // 2].softmax(dim=-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = _median_filter((weights - mean) / std, MEDIAN_FILTER_WIDTH)
    matrix = weights.mean(dim=0)[len(sot_sequence) : -1]  # the rows of <|notimestamps|> and the text
    text_indices, time_indices = _dynamic_time_warping(-matrix.double().numpy())
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / TOKENS_PER_SECOND  # [len(text) + 1]: token i spans [i, i + 1]

    words, word_tokens, indices = _combine_tokens_into_words(
        bundle.tokenizer, list(text_tokens), LANGUAGES.get(language, "english"), prepend_punctuations=PREPEND_PUNCTUATIONS,
        append_punctuations=APPEND_PUNCTUATIONS,
    )
    return [
        _Timing(word, tokens_, float(jump_times[idx[0]]), float(jump_times[idx[-1] + 1]),
                float(np.mean([text_probs[i] for i in idx])))
        for word, tokens_, idx in zip(words, word_tokens, indices)
    ]


def add_word_timestamps(
    bundle: WhisperBundle, hidden: torch.Tensor, sot_sequence: list[int], segments: Sequence[dict],
    num_frames: int, time_offset: float, last_speech_timestamp: float, language: str,
) -> float:
    """Give a window's segments (dicts with start, end, tokens) their `words` ([Word]) and move
    their start/end to their words where openai-whisper does; returns the new last speech time."""
    text_per_segment = [[t for t in s["tokens"] if t < bundle.settings.eos_token_id] for s in segments]
    alignment = _find_alignment(bundle, hidden, sot_sequence, [t for ts in text_per_segment for t in ts], num_frames, language)
    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    # a word at a sentence boundary is often stretched over the pause: cut it to `longest`
    if len(durations):
        for i in range(1, len(alignment)):
            if alignment[i].end - alignment[i].start > longest:
                if alignment[i].word.strip() in SENTENCE_END_MARKS:
                    alignment[i].end = alignment[i].start + longest
                elif alignment[i - 1].word.strip() in SENTENCE_END_MARKS:
                    alignment[i].start = alignment[i].end - longest

    index = 0
    for segment, text_tokens in zip(segments, text_per_segment):
        taken, words = 0, []
        while index < len(alignment) and taken < len(text_tokens):
            timing = alignment[index]
            if timing.word:
                words.append(dict(word=timing.word, start=round(time_offset + timing.start, 2),
                                  end=round(time_offset + timing.end, 2), probability=timing.probability))
            taken += len(timing.tokens)
            index += 1
        if words:
            first, last = words[0], words[-1]
            # a first word stretched back over a pause: cut to `longest`
            if first["end"] - last_speech_timestamp > median * 4 and (
                first["end"] - first["start"] > longest
                or (len(words) > 1 and words[1]["end"] - first["start"] > longest * 2)
            ):
                if len(words) > 1 and words[1]["end"] - words[1]["start"] > longest:
                    boundary = max(words[1]["end"] / 2, words[1]["end"] - longest)
                    first["end"] = words[1]["start"] = boundary
                first["start"] = max(0.0, first["end"] - longest)
            # prefer the segment's timestamps where its first/last word looks too long
            if segment["start"] < first["end"] and segment["start"] - 0.5 > first["start"]:
                first["start"] = max(0.0, min(first["end"] - median, segment["start"]))
            else:
                segment["start"] = first["start"]
            if segment["end"] > last["start"] and segment["end"] + 0.5 < last["end"]:
                last["end"] = max(last["start"] + median, segment["end"])
            else:
                segment["end"] = last["end"]
            last_speech_timestamp = segment["end"]
        segment["words"] = tuple(Word(**w) for w in words)
    return last_speech_timestamp

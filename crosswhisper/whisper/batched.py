"""Batched transcription (DESIGN §1.6): many files, and long files, decoded B windows at a time.

faster-whisper's `BatchedInferencePipeline` pattern, exact per row:

    chunks     a voice-activity detector (silero-vad) finds speech; neighbouring speech is
               merged into chunks of at most 30 s, cut at pauses (`speech_chunks`)
    batches    the chunks of every input, in order, `batch_size` at a time: one encoder call,
               one `decode_windows` (our loop over B rows: each row is its window decoded alone)
    segments   each chunk is decoded with timestamps and cut into segments at timestamp pairs,
               at their times in the file; a decode that stops short of its chunk's end (text
               after the last pair unfinished, or speech left undecoded) leaves the rest of the
               chunk, from the last timestamp, to a later batch: Whisper's seek rule per chunk,
               the rest joined to the input's next chunk when both fit in one window (`_Schedule`)
               (a rest under `MIN_REST_SECONDS` keeps the unfinished text instead); segments are
               clipped to their chunk's audio, so a file's segments never overlap
    fallback   a chunk that fails the thresholds (compression ratio, log-probability) is decoded
               again at the next temperature, together with the other chunks that failed

Chunks are decoded independently: no previous-text prompt (the initial prompt, if given,
prompts every chunk), as faster-whisper's batched pipeline does. So a transcript differs from
`transcribe()`'s sequential one (which conditions each window on the last), but not by batch
size: every batch size gives the same tokens as `batch_size=1` (tested).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..audio import SAMPLE_RATE, AudioInput, load_audio
from ..engine import default_gamma
from ..lora import AdaptedModel, AdapterArgument, resolve_adapter
from ..results import Segment, StatsCounter, Transcription
from .alignment import add_word_timestamps
from .decode import decode_windows, detect_language, is_multilingual, validate_language
from .loading import WhisperBundle, run_encoder, with_compute_type
from .longform import (
    FEATURE_PRECISION,
    HOP,
    MIN_WINDOW_FRAMES,
    SILENCE_PEAK,
    WINDOW_FRAMES,
    SpecialTokens,
    WindowTokens,
    initial_tokens,
    judge_window,
    previous_tokens,
    prompt_text_tokens,
    split_segments,
)

logger = logging.getLogger(__name__)

MAX_CHUNK_SECONDS = 30.0  # one Whisper window
# Draft slots per call when the caller does not choose, for batches of more than one window.
# On a CPU a batch already fills the cores: a drafting call over 8 windows costs 2.15× a plain
# one (tiny.en: 45 ms against 21 ms; vocabulary projection, cross-attention over 8 windows'
# audio, logits processing all grow with the tokens per call), more than the 1.66 tokens per
# call it commits, so the plain loop (exact all the same) decodes faster there. A GPU has the
# compute to spare: drafting pays.
BATCHED_GAMMA = {"cpu": 0, "cuda": 4}
# silero-vad's settings as faster-whisper's batched pipeline sets them: short pauses (160 ms)
# separate speech, each piece keeps 400 ms of context on both sides
VAD_THRESHOLD = 0.5
MIN_SILENCE_MS = 160
SPEECH_PAD_MS = 400
# The rest of a chunk (after its last timestamp) is decoded again alone only when it holds this
# much audio: a shorter one, padded to 30 s with silence, is mostly the VAD's padding, and
# Whisper tends to invent a phrase for it (the unfinished text of the first decode is kept).
MIN_REST_SECONDS = 1.0


@lru_cache(maxsize=1)
def _vad():
    """silero-vad's sequence model (onnxruntime: a block of frames per call, the same
    probabilities as its per-frame model) and its speech-timestamps function."""
    threads = torch.get_num_threads()
    try:
        from silero_vad import load_silero_vad
        from silero_vad.sequence_vad import get_speech_timestamps_sequence
    finally:
        torch.set_num_threads(threads)  # importing silero_vad sets torch's threads to 1
    return load_silero_vad(sequence=True), get_speech_timestamps_sequence


def speech_chunks(audio: np.ndarray, *, max_seconds: float = MAX_CHUNK_SECONDS) -> list[tuple[int, int]]:
    """[start, end) samples of the chunks to decode: silero-vad's speech, neighbours merged while
    the chunk stays within `max_seconds` (a piece longer than that is cut by the VAD at its
    quietest point). Audio of one window or less is one chunk, undetected (the no-speech rule
    judges its silence, as in `transcribe()`). Starts fall on a log-mel frame (a multiple of 160 samples), so a chunk's
    timestamps are exact times in the file."""
    if audio.size == 0:
        return []
    if audio.size <= max_seconds * SAMPLE_RATE:  # one window already: nothing to cut
        return [(0, audio.size)]
    model, speech_timestamps = _vad()
    speech = speech_timestamps(
        np.ascontiguousarray(audio, dtype=np.float32), model, threshold=VAD_THRESHOLD, sampling_rate=SAMPLE_RATE,
        min_silence_duration_ms=MIN_SILENCE_MS, speech_pad_ms=SPEECH_PAD_MS,
        max_speech_duration_s=max_seconds - 2 * SPEECH_PAD_MS / 1000,
    )
    limit = int(max_seconds * SAMPLE_RATE)
    chunks: list[list[int]] = []
    for piece in speech:
        start = piece["start"] // HOP * HOP
        if chunks and start < chunks[-1][1]:  # (two paddings may overlap by the rounding: keep times disjoint)
            start = -(-chunks[-1][1] // HOP) * HOP
        end = min(piece["end"], start + limit)
        if chunks and end - chunks[-1][0] <= limit:
            chunks[-1][1] = max(chunks[-1][1], end)
        else:
            chunks.append([start, end])
    return [(start, end) for start, end in chunks]


@dataclass(frozen=True)
class _Chunk:
    source: int  # index of the input it comes from
    start: int  # first sample in that input
    audio: np.ndarray  # its samples (≤ 30 s)
    index: Optional[int] = None  # its place among its input's chunks (None: the rest of a chunk)

    @property
    def end(self) -> int:
        return self.start + len(self.audio)


class _Schedule:
    """Which chunks go into the next batch. A chunk whose decode stops short leaves a rest
    (`_segments`); decoded alone, a rest is a short window padded with silence, so it is
    prepended to its input's next chunk when both fit in one window (as Whisper's sequential
    seek would see it: the rest followed by what comes after). For that, a chunk waits until
    the one before it is decoded: the even chunks of every input go first, an odd one as soon
    as its predecessor is done; rests that cannot join a chunk are decoded alone. What each
    window holds depends only on earlier decodes, never on the batch size."""

    def __init__(self, chunks: Sequence[_Chunk], waveforms: Sequence[np.ndarray]):
        self.waveforms = waveforms
        self.first = deque(c for c in chunks if c.index % 2 == 0)
        self.waiting = {(c.source, c.index): c for c in chunks if c.index % 2 == 1}
        self.ready: deque = deque()  # odd chunks whose predecessor is decoded, and lone rests

    def __bool__(self) -> bool:
        return bool(self.first or self.waiting or self.ready)

    def next_batch(self, size: int) -> list[_Chunk]:
        batch = []
        for queue in (self.first, self.ready):
            while queue and len(batch) < size:
                batch.append(queue.popleft())
        return batch

    def done(self, chunk: _Chunk, rest: Optional[int]) -> None:
        """`chunk` is decoded; `rest`: where its undecoded rest starts (a sample), if any."""
        following = None if chunk.index is None else self.waiting.pop((chunk.source, chunk.index + 1), None)
        audio = self.waveforms[chunk.source]
        if rest is not None:
            if following is not None and following.end - rest <= MAX_CHUNK_SECONDS * SAMPLE_RATE:
                following = _Chunk(chunk.source, rest, audio[rest : following.end], following.index)
            else:
                self.ready.append(_Chunk(chunk.source, rest, audio[rest : chunk.end]))
        if following is not None:
            self.ready.append(following)


class BatchedTranscriber:
    """Decodes chunks `batch_size` at a time with our loop (cross-regressive with an adapter,
    plain without), the temperature fallback included. One per model, adapter and options."""

    def __init__(self, bundle: WhisperBundle, adapted: Optional[AdaptedModel], options, *, batch_size: int, device):
        self.bundle, self.adapted, self.options = bundle, adapted, options
        self.batch_size = batch_size
        self.decode_options = options.decode_options(device)
        if options.gamma is None and batch_size > 1:
            self.decode_options = replace(self.decode_options, gamma=default_gamma(BATCHED_GAMMA, device))
        self.ids = SpecialTokens.of(bundle)
        self.generator = None
        if max(options.temperature) > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(options.seed if options.seed is not None else torch.seed())

    def encode(self, chunks: Sequence[_Chunk]) -> torch.Tensor:
        """Encoder hidden states [B, frames, d]: each chunk padded with silence to 30 s, as
        `decode.encode` does for one window."""
        return run_encoder(self.bundle, self.bundle.log_mel([chunk.audio for chunk in chunks]))

    def decode(self, hidden: torch.Tensor, prompts: list[list[int]]) -> list:
        """Every window decoded at the first temperature; those that fail the thresholds again,
        together, at the next (`longform.judge_window`, the sequential loop's rules)."""
        decisions: list = [None] * len(prompts)
        attempts: list[list[WindowTokens]] = [[] for _ in prompts]
        todo = list(range(len(prompts)))
        temperatures = self.options.temperature
        for step, temperature in enumerate(temperatures):
            options = replace(self.decode_options, temperature=temperature)
            results = decode_windows(
                self.bundle, hidden[todo], [prompts[i] for i in todo], adapted=self.adapted, options=options,
                generator=self.generator,
            )
            again = []
            for i, result in zip(todo, results):
                decoded = WindowTokens(
                    tokens=result.tokens, token_logprobs=result.token_logprobs, no_speech_prob=result.no_speech_prob,
                    forward_calls=result.forward_calls, accepted=dict(result.accepted),
                )
                attempts[i].append(decoded)
                decision = judge_window(decoded, temperature, self.options, self.ids, tuple(attempts[i]),
                                        last=step == len(temperatures) - 1)
                if decision is None:
                    again.append(i)
                else:
                    decisions[i] = decision
            if not again:
                break
            todo = again
        return decisions


def _segments(ids: SpecialTokens, chunk: _Chunk, decision) -> tuple[list[dict], Optional[int]]:
    """A chunk's tokens → its segments at their times in the file, and where the rest of the
    chunk starts (a sample in the file) when the decode stopped short of its end: Whisper's
    seek rule (`longform.split_segments`), the unfinished text after the last timestamp pair
    dropped, to be decoded again from there. None: the chunk is done."""
    tokens = list(decision.decoded.tokens)
    if tokens and tokens[-1] == ids.eot:
        tokens.pop()
    if not tokens:
        return [], None
    seek = chunk.start // HOP
    frames = min(WINDOW_FRAMES, -(-len(chunk.audio) // HOP))
    pieces, advance = split_segments(tokens, seek, frames, ids.timestamp_begin)
    chunk_end = (seek + frames) * FEATURE_PRECISION
    # a chunk is its audio padded with silence: what the decode places after the audio's end is
    # not in the file (dropped), and no segment runs past it (so a file's segments never overlap)
    found = [dict(start=p.start, end=min(p.end, chunk_end), tokens=p.tokens, words=()) for p in pieces if p.start < chunk_end]
    if 0 < advance and (frames - advance) * FEATURE_PRECISION >= MIN_REST_SECONDS:
        return found, chunk.start + advance * HOP
    if advance < frames:  # (a rest too short to decode, or no progress at all: keep its text)
        rest = tokens[sum(len(p.tokens) for p in pieces) :]
        if any(t < ids.eot for t in rest):
            start = found[-1]["end"] if found else seek * FEATURE_PRECISION
            found.append(dict(start=start, end=chunk_end, tokens=tuple(rest), words=()))
    return found, None


def transcribe_batch(
    audios: Sequence[AudioInput],
    *,
    model: Union[str, WhisperBundle] = "tiny.en",
    adapter: AdapterArgument = "auto",
    device: str = "cpu",
    batch_size: int = 8,
    options=None,
    progress: Optional[Callable[[float], None]] = None,
    **decoding,
) -> list[Transcription]:
    """Transcribe many inputs, and long ones, `batch_size` windows at a time (module doc).

    audios: paths FFmpeg reads or 16 kHz mono float32 arrays; one `Transcription` each, in order.
    model, adapter, device, options (or its fields as keywords): as `transcribe()`'s.
    `adapter=None` decodes with our own plain loop (γ = 0), batched too. `beam_size` > 1 and
    `condition_on_previous_text` do not apply: chunks are decoded greedily (sampled at the
    fallback temperatures) and independently.
    batch_size: windows per encoder and decoder call (8 is faster-whisper's default).
    progress: called with the seconds of audio done (over all inputs) after every batch.
    """
    from .transcribe import TranscribeOptions, get_bundle

    if isinstance(audios, (str, np.ndarray)) or not isinstance(audios, Sequence):
        raise TypeError("transcribe_batch takes a list of inputs (paths or arrays)")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer ≥ 1, not {batch_size!r}")
    if options is not None and decoding:
        raise TypeError("pass either options= or its fields as keywords, not both")
    options = options or TranscribeOptions(**decoding)
    if options.beam_size > 1:
        logger.warning("beam_size=%d is ignored by batched transcription (greedy)", options.beam_size)
    bundle = with_compute_type(get_bundle(model, device=device), options.compute_type)
    language = validate_language(bundle, options.language)
    if options.task == "translate" and not is_multilingual(bundle):
        raise ValueError(f"{bundle.name} is an English-only model: it cannot translate")
    adapted = resolve_adapter(bundle, adapter) if adapter is not None else None
    transcriber = BatchedTranscriber(bundle, adapted, options, batch_size=batch_size, device=device)
    ids = transcriber.ids
    context = [tuple(prompt_text_tokens(bundle, options.initial_prompt))] if options.initial_prompt else []
    prefix = previous_tokens(context, ids) if context else []

    waveforms = [load_audio(audio) for audio in audios]
    chunks = []
    t0 = time.perf_counter()
    for source, waveform in enumerate(waveforms):
        index = 0
        for start, end in speech_chunks(waveform):
            audio = waveform[start:end]
            # as the sequential loop: under 0.1 s no word fits, and on digital silence Whisper
            # invents a phrase the no-speech rule does not always catch
            if (end - start) // HOP >= MIN_WINDOW_FRAMES and np.abs(audio).max() >= SILENCE_PEAK:
                chunks.append(_Chunk(source, start, audio, index))
                index += 1
    vad_seconds = time.perf_counter() - t0
    logger.info("%d chunks of speech in %d input(s) (voice activity detection: %.1f s)", len(chunks), len(waveforms), vad_seconds)

    languages: list[Optional[str]] = [language] * len(waveforms)
    segments: list[list[Segment]] = [[] for _ in waveforms]
    skipped = [0] * len(waveforms)
    windows = [0] * len(waveforms)
    last_speech = [0.0] * len(waveforms)  # end of each input's last word so far (word timestamps)
    counters = [StatsCounter() for _ in waveforms]
    speech_seconds = sum(len(chunk.audio) for chunk in chunks) / SAMPLE_RATE
    total_seconds = sum(len(w) for w in waveforms) / SAMPLE_RATE
    done_seconds = 0.0
    schedule = _Schedule(chunks, waveforms)
    while schedule:
        batch = schedule.next_batch(batch_size)
        t0 = time.perf_counter()
        hidden = transcriber.encode(batch)
        prompts = []
        for row, chunk in enumerate(batch):
            if languages[chunk.source] is None:  # detected once per input, on its first chunk
                languages[chunk.source] = detect_language(bundle, hidden[row : row + 1])
            prompts.append(prefix + initial_tokens(bundle, languages[chunk.source], options.task, options.without_timestamps))
        t1 = time.perf_counter()
        decisions = transcriber.decode(hidden, prompts)
        t2 = time.perf_counter()
        for row, (chunk, decision) in enumerate(zip(batch, decisions)):
            source, counter = chunk.source, counters[chunk.source]
            # each input's share of the batch's time: its share of the batch's windows
            counter.encode_seconds += (t1 - t0) / len(batch)
            counter.decode_seconds += (t2 - t1) / len(batch)
            for attempt in decision.attempts:
                counter.add(tokens=len(attempt.tokens), forward_calls=attempt.forward_calls, accepted=attempt.accepted)
            windows[source] += 1
            if decision.skip:
                skipped[source] += 1
                done_seconds += len(chunk.audio) / SAMPLE_RATE
                schedule.done(chunk, None)
                continue
            found, rest = _segments(ids, chunk, decision)
            schedule.done(chunk, rest)  # a rest is decoded again from its last timestamp, in a later batch
            done_seconds += ((rest if rest is not None else chunk.end) - chunk.start) / SAMPLE_RATE
            language = languages[source]
            if options.word_timestamps and found:
                sot_sequence = initial_tokens(bundle, language, options.task, without_timestamps=True)[:-1]
                frames = min(WINDOW_FRAMES, -(-len(chunk.audio) // HOP))
                last_speech[source] = add_word_timestamps(
                    bundle, hidden[row : row + 1], sot_sequence, found, frames, chunk.start / SAMPLE_RATE,
                    last_speech[source], language,
                )
            for piece in found:
                segments[source].append(Segment(
                    start=piece["start"], end=piece["end"],
                    text=bundle.vocabulary.decode([t for t in piece["tokens"] if t < ids.eot]).strip(),
                    tokens=piece["tokens"], avg_logprob=decision.avg_logprob,
                    compression_ratio=decision.compression_ratio, no_speech_prob=decision.decoded.no_speech_prob,
                    temperature=decision.temperature, words=piece["words"],
                ))
        if progress is not None:  # in audio seconds: the share of the speech decoded so far
            progress(total_seconds * min(1.0, done_seconds / speech_seconds))

    results = []
    for source, waveform in enumerate(waveforms):
        segments[source].sort(key=lambda segment: segment.start)  # (the rests of chunks come later)
        tokens = tuple(t for segment in segments[source] for t in segment.tokens)
        results.append(Transcription(
            text=bundle.vocabulary.decode([t for t in tokens if t < ids.eot]).strip(), tokens=tokens,
            language=languages[source] or "en", segments=tuple(segments[source]),
            duration=len(waveform) / SAMPLE_RATE, stats=counters[source].stats(), windows=windows[source],
            skipped=skipped[source],
        ))
    return results

"""Whisper's sequential long-form transcription (DESIGN §1.5), rule for rule as transformers'
long-form `WhisperForConditionalGeneration.generate` runs it (transformers 5.24,
`models/whisper/generation_whisper.py`); openai-whisper's `transcribe()` is the user-facing spec
(option names, defaults, meaning of the thresholds).

    features      `long_form_features()`: log-mel of the whole audio; `window_features()`: one window
    prompt        `initial_tokens()` + `previous_tokens()`: <|startofprev|> + context + <|startoftranscript|> ...
    one window    a `WindowDecode` callable → `WindowTokens` (`ReferenceDecoder`: transformers' generate)
    fallback      `decode_with_fallback()`: temperatures, compression ratio, avg log-prob, no-speech
    segments      `split_segments()`: timestamp pairs → segments, and how far `seek` moves
    the loop      `transcribe_features()` / `transcribe_long_form()` → `Transcription`

The window decoder is a parameter, so the same loop runs transformers' decode (the reference)
and our own loop with or without drafting; the loop itself never calls the model's decoder.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..audio import SAMPLE_RATE, AudioInput, load_audio
from ..results import Segment, StatsCounter, Transcription
from .alignment import add_word_timestamps
from .frontend import LogMel
from .decode import decoder_prompt, detect_language, is_multilingual, validate_language
from .loading import WhisperBundle, run_encoder

logger = logging.getLogger(__name__)

TIME_PRECISION = 0.02  # seconds per timestamp-token step (<|0.00|>, <|0.02|>, ...)
FEATURE_PRECISION = 0.01  # seconds per log-mel frame (hop of 160 samples at 16 kHz)
INPUT_STRIDE = 2  # log-mel frames per encoder position (conv1 stride 1 × conv2 stride 2)
WINDOW_FRAMES = 3000  # log-mel frames per window: INPUT_STRIDE × max_source_positions (1500)
HOP = 160  # audio samples per log-mel frame
# Peak amplitude below which a window is digital silence (about -80 dBFS): Whisper invents a
# phrase on it ("you") that the no-speech rule does not always catch, so such a window is not
# decoded at all (our one departure from transformers' loop; real audio never hits it)
SILENCE_PEAK = 1e-4
# Frames of audio below which a window is not decoded either (0.1 s: no word fits): a whole file
# that short (a 50 ms click) is padded to a 30 s window of which Whisper transcribes the padding
# ("you", with a log-probability above the no-speech rule's threshold); faster-whisper gives ""
MIN_WINDOW_FRAMES = 10


@dataclass(frozen=True)
class LongFormOptions:
    """openai-whisper's `transcribe()` options for long audio, with its defaults."""

    # decoding temperatures tried in turn; the next one only when a window fails the thresholds
    temperature: tuple[float, ...] = field(default=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), metadata={
        "help": "temperature of the first decode of a window (default: 0, greedy)"})
    # a window whose tokens zlib-compress better than this is too repetitive: decode it again hotter
    compression_ratio_threshold: Optional[float] = field(default=2.4, metadata={
        "help": "decode a window again, hotter, when its compression ratio is above this (default: 2.4)"})
    # a window whose average token log-probability is below this failed: decode it again hotter
    logprob_threshold: Optional[float] = field(default=-1.0, metadata={
        "help": "decode a window again, hotter, when its average log-probability is below this (default: -1)"})
    # a window with P(<|nospeech|>) above this AND avg log-prob below logprob_threshold is silence: skipped
    no_speech_threshold: Optional[float] = field(default=0.6, metadata={
        "help": "skip a window as silence when P(no speech) is above this and its log-probability low (default: 0.6)"})
    # prompt each window with <|startofprev|> + the previous windows' tokens (at most half the context)
    condition_on_previous_text: bool = field(default=True, metadata={
        "help": "prompt each window with the text before it (default: on)"})
    # text put before the first window's tokens as if it had been said (style, spelling, names)
    initial_prompt: Optional[str] = field(default=None, metadata={
        "help": "text to prompt the first window with (spelling, names, style)"})
    # decode with <|notimestamps|>: one segment per window, `seek` moves a whole window each time
    without_timestamps: bool = field(default=False, metadata={
        "help": "no timestamp tokens: one segment per 30 s window"})
    # per segment, its words with start/end times from the alignment heads' attention + DTW
    word_timestamps: bool = field(default=False, metadata={
        "help": "word-level timestamps (cross-attention alignment + dynamic time warping)"})
    # "transcribe" or "translate" (into English; multilingual models only)
    task: str = field(default="transcribe", metadata={
        "help": "transcribe, or translate into English (multilingual models)", "choices": ("transcribe", "translate")})
    # language code; None detects it once, on the first window (multilingual models; "en" for .en)
    language: Optional[str] = field(default=None, metadata={
        "help": "language code (default: detected on the first window; 'en' for .en models)"})

    def __post_init__(self):
        temps = tuple(float(t) for t in (self.temperature if isinstance(self.temperature, (tuple, list)) else (self.temperature,)))
        if not temps or any(t < 0 for t in temps):
            raise ValueError(f"temperature must be one or more values ≥ 0, not {self.temperature!r}")
        object.__setattr__(self, "temperature", temps)
        if self.task not in ("transcribe", "translate"):
            raise ValueError(f"task must be 'transcribe' or 'translate', not {self.task!r}")


@dataclass(frozen=True)
class WindowTokens:
    """What a window decoder returns for one decode of one window at one temperature."""

    tokens: list[int]  # generated tokens (no prompt), end-of-text included when produced
    # per generated token (end-of-text included, aligned with `tokens`): log-softmax of the
    # *processed* logits (suppression, timestamp rules) at temperature 1, at that token's id
    token_logprobs: list[float]
    no_speech_prob: float  # softmax of the *raw* logits at the <|startoftranscript|> position, at <|nospeech|>
    forward_calls: int  # decoder forward calls this decode made
    accepted: dict = field(default_factory=dict)  # tokens committed per call → calls (drafting stats)


# decode(encoder hidden states [1, 1500, d], prompt token ids, temperature) → WindowTokens.
# The prompt is everything before the first generated token; the decoder applies Whisper's
# logits processing with the first generated position at index len(prompt): suppress_tokens
# everywhere, begin_suppress_tokens at the first position, and — unless prompt[-1] is
# <|notimestamps|> — the timestamp rules over the generated tokens only. It stops at
# end-of-text or when prompt + generated reach max_target_positions (448); temperature 0 is
# greedy, > 0 samples from softmax(processed logits / temperature).
WindowDecode = Callable[[torch.Tensor, list, float], WindowTokens]


# ---------------------------------------------------------------------------------------------
# features


def long_form_features(bundle: WhisperBundle, audio: np.ndarray) -> "torch.Tensor | StreamedFeatures":
    """Log-mel features [1, n_mels, frames] as transformers' ASR pipeline gives them to `generate`:
    audio longer than 30 s over its whole length (`truncation=False, padding="longest"`; the
    log-mel's dynamic-range clamp then spans the whole audio) as `StreamedFeatures`, computed a
    window at a time; shorter audio zero-padded to 30 s first (the feature extractor's default:
    3000 frames), as a tensor."""
    mel = bundle.mel
    if mel is not None:  # our log-mel, transformers' numbers (no dither)
        if len(audio) > mel.n_samples:
            return StreamedFeatures(mel, audio, device=bundle.weights.device, dtype=bundle.weights.dtype)
        return bundle.log_mel([audio]).to(bundle.weights.dtype)
    extractor = bundle.feature_extractor  # a front end of its own (e.g. dither): transformers computes it
    extra = dict(truncation=False, padding="longest", return_attention_mask=True) if len(audio) > extractor.n_samples else {}
    features = extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", **extra).input_features
    return features.to(bundle.weights.device, bundle.weights.dtype)


class StreamedFeatures:
    """The whole-audio log-mel of `WhisperFeatureExtractor` (torch path, no dither), frame for
    frame the same numbers, without ever holding it: one pass over the audio finds the maximum
    the dynamic-range clamp needs, then each window's frames are computed when the loop asks.
    Besides the audio itself, memory stays that of one window whatever its length (the
    whole-audio STFT of an hour takes ~2 GB). A frame depends only on its 400 samples
    (reflect-padded at the audio's ends), so a frame computed in a chunk equals the one computed
    over the whole audio (tested)."""

    CHUNK = 3000  # frames per piece of the maximum's pass

    def __init__(self, mel: LogMel, audio: np.ndarray, *, device: torch.device, dtype: torch.dtype):
        self.mel, self.device, self.dtype = mel, device, dtype
        self.audio = torch.from_numpy(np.asarray(audio, dtype=np.float32))
        self.n_fft, self.hop = mel.n_fft, mel.hop_length
        self.window_fn = torch.hann_window(self.n_fft)
        frames = len(audio) // self.hop  # the extractor drops the STFT's last frame
        self.shape = (1, mel.feature_size, frames)
        self.maximum = max(self._log_mel(a, min(a + self.CHUNK, frames)).max() for a in range(0, frames, self.CHUNK))

    def _log_mel(self, first: int, end: int) -> torch.Tensor:
        """log10 mel power [n_mels, end - first] of frames [first, end), before the clamp."""
        half = self.n_fft // 2
        index = torch.arange(first * self.hop - half, (end - 1) * self.hop + half)
        last = len(self.audio) - 1
        index = torch.where(index < 0, -index, torch.where(index > last, 2 * last - index, index))  # reflect
        stft = torch.stft(self.audio[index], self.n_fft, self.hop, window=self.window_fn, center=False, return_complex=True)
        return self.mel.log10_power(stft)

    def window(self, seek: int) -> torch.Tensor:
        """Frames [seek, seek + 3000) [1, n_mels, ≤ 3000], clamped and scaled as the extractor does."""
        end = min(seek + WINDOW_FRAMES, self.shape[-1])
        return LogMel.scaled(self._log_mel(seek, end), self.maximum).unsqueeze(0).to(self.device, self.dtype)


def window_features(features, seek: int) -> torch.Tensor:
    """Frames [seek, seek + 3000) of [1, n_mels, frames] (a tensor or `StreamedFeatures`),
    right-padded with 0.0 to 3000 frames (transformers' `_get_input_segment`; openai-whisper
    pads the audio instead, so its last window's padding is log-mel silence, not 0.0)."""
    if isinstance(features, StreamedFeatures):
        window = features.window(seek)
    else:
        window = features[:, :, seek : seek + WINDOW_FRAMES]
    if window.shape[-1] < WINDOW_FRAMES:
        window = torch.nn.functional.pad(window, (0, WINDOW_FRAMES - window.shape[-1]))
    return window


def encode_window(bundle: WhisperBundle, window: torch.Tensor) -> torch.Tensor:
    """One window's log-mel [1, n_mels, 3000] → encoder hidden states [1, 1500, d_model]."""
    return run_encoder(bundle, window)


# ---------------------------------------------------------------------------------------------
# prompt


@dataclass(frozen=True)
class SpecialTokens:
    """The ids the loop needs; read from the model's generation config, never hard-coded."""

    eot: int  # <|endoftext|> (also the pad token)
    sot_prev: int  # <|startofprev|>
    no_timestamps: int  # <|notimestamps|>
    timestamp_begin: int  # <|0.00|> = <|notimestamps|> + 1; every id from here on is a timestamp
    no_speech: int  # <|nospeech|> (v3) / <|nocaptions|>: always <|notimestamps|> - 1, as transformers takes it
    vocab_size: int  # the model's logits width (sets the byte width of the compression ratio)
    max_positions: int  # decoder context (448)

    @classmethod
    def of(cls, bundle: WhisperBundle) -> "SpecialTokens":
        config = bundle.settings
        return cls(
            eot=config.eos_token_id,
            sot_prev=config.prev_sot_token_id,
            no_timestamps=config.no_timestamps_token_id,
            timestamp_begin=config.no_timestamps_token_id + 1,
            no_speech=config.no_timestamps_token_id - 1,
            vocab_size=bundle.weights.config.vocab_size,
            max_positions=bundle.weights.config.max_target_positions,
        )


def initial_tokens(bundle: WhisperBundle, language: str, task: str, without_timestamps: bool) -> list[int]:
    """<|startoftranscript|> [<|lang|> <|transcribe|>/<|translate|>] [<|notimestamps|>]."""
    return decoder_prompt(bundle, language, task=task, timestamps=not without_timestamps)


def prompt_text_tokens(bundle: WhisperBundle, text: str) -> list[int]:
    """An initial prompt's tokens, as openai-whisper and `WhisperProcessor.get_prompt_ids` make them."""
    return bundle.vocabulary.encode(" " + text.strip())


def previous_tokens(context: Sequence[Sequence[int]], ids: SpecialTokens) -> list[int]:
    """<|startofprev|> + the last `max_positions // 2 - 1` (223) tokens of the context pieces (the
    initial prompt, then every segment so far), as transformers' `_prepare_decoder_input_ids`.
    A piece ending in a timestamp pair loses its last timestamp first (transformers'
    `skip_ending_double_timestamps`: openai-whisper's segments stop before it)."""
    flat: list[int] = []
    for piece in context:
        piece = list(piece)
        if len(piece) > 2 and piece[-2] >= ids.timestamp_begin:
            piece = piece[:-1]
        flat += piece
    cut = ids.max_positions // 2 - 1
    return [ids.sot_prev] + flat[-cut:]


# ---------------------------------------------------------------------------------------------
# the fallback rules


def compression_ratio(text: str) -> float:
    """openai-whisper's ratio: UTF-8 bytes of the text / its zlib-compressed bytes. transformers
    (`_retrieve_compression_ratio`) measures the *token ids* instead (`token_compression_ratio`),
    which is what the loop uses, for exactness with transformers; the two differ in value (a
    token is 2 bytes, a text token ~4 characters), the 2.4 threshold is shared all the same."""
    text_bytes = text.encode("utf-8")
    return len(text_bytes) / len(zlib.compress(text_bytes))


def token_compression_ratio(tokens: Sequence[int], vocab_size: int) -> float:
    """transformers' ratio: each token id as `int(log2(vocab_size) / 8) + 1` (= 2) little-endian
    bytes, timestamps and end-of-text included; raw bytes / zlib-compressed bytes."""
    width = int(math.log2(vocab_size) / 8) + 1
    token_bytes = b"".join(int(t).to_bytes(width, "little") for t in tokens)
    return len(token_bytes) / len(zlib.compress(token_bytes))


def average_logprob(token_logprobs: Sequence[float]) -> float:
    """Sum of the generated tokens' log-probabilities (end-of-text included) / their count,
    accumulated in float32 one token after the other as transformers' `_retrieve_avg_logprobs`
    does (openai-whisper divides by len + 1 with end-of-text excluded: the same number when the
    decode ended with end-of-text)."""
    if not token_logprobs:
        return float("-inf")
    total = np.float32(0.0)
    for logprob in token_logprobs:
        total = np.float32(total + np.float32(logprob))
    return float(np.float32(total / np.float32(len(token_logprobs))))


@dataclass(frozen=True)
class WindowDecision:
    """A window's final decode and what the fallback rules made of it."""

    decoded: WindowTokens  # the last decode (the one kept)
    temperature: float  # its temperature
    avg_logprob: float
    compression_ratio: float
    skip: bool  # silence: no segments from this window, `seek` moves a whole window
    attempts: tuple[WindowTokens, ...]  # every decode, the kept one last (for the stats)


def decode_with_fallback(
    decode: WindowDecode, hidden: torch.Tensor, prompt: list[int], options: LongFormOptions, ids: SpecialTokens
) -> WindowDecision:
    """Decode at each temperature in turn until one passes (transformers' `generate_with_fallback`
    and `_need_fallback`, batch of one): the last temperature's decode is kept whatever it is."""
    attempts: list[WindowTokens] = []
    for index, temperature in enumerate(options.temperature):
        attempts.append(decode(hidden, prompt, temperature))
        decision = judge_window(attempts[-1], temperature, options, ids, tuple(attempts), last=index == len(options.temperature) - 1)
        if decision is not None:
            return decision
    raise AssertionError("unreachable")


def judge_window(
    decoded: WindowTokens, temperature: float, options: LongFormOptions, ids: SpecialTokens,
    attempts: tuple[WindowTokens, ...], *, last: bool,
) -> Optional[WindowDecision]:
    """The fallback rules on one decode: its `WindowDecision`, or None when the window must be
    decoded again at the next temperature (never after the `last` one)."""
    ratio = token_compression_ratio(decoded.tokens, ids.vocab_size)  # end-of-text counted
    avg = average_logprob(decoded.token_logprobs)
    needs_fallback = skip = False
    # too repetitive
    if options.compression_ratio_threshold is not None and ratio > options.compression_ratio_threshold:
        needs_fallback = True
    # too unlikely
    if options.logprob_threshold is not None and avg < options.logprob_threshold:
        needs_fallback = True
    # silence: likely <|nospeech|> and an unlikely decode → no fallback, skip the window.
    # (transformers needs logprob_threshold here; without one we follow openai-whisper: the
    # no-speech probability alone decides)
    if (
        options.no_speech_threshold is not None
        and decoded.no_speech_prob > options.no_speech_threshold
        and (options.logprob_threshold is None or avg < options.logprob_threshold)
    ):
        needs_fallback, skip = False, True
    if needs_fallback and not last:
        return None
    return WindowDecision(decoded, temperature, avg, ratio, skip, attempts)


# ---------------------------------------------------------------------------------------------
# segments


@dataclass(frozen=True)
class RawSegment:
    start: float  # seconds
    end: float  # seconds
    tokens: tuple[int, ...]  # timestamps included


def split_segments(
    tokens: Sequence[int], seek: int, seek_num_frames: int, timestamp_begin: int
) -> tuple[list[RawSegment], int]:
    """A window's generated tokens (end-of-text removed) → its segments and how many frames
    `seek` moves, as transformers' `_retrieve_segment` (openai-whisper's rules, the same times).

    The window starts at `seek` frames and holds `seek_num_frames` frames of audio (≤ 3000)."""
    tokens = [int(t) for t in tokens]
    is_ts = [t >= timestamp_begin for t in tokens]
    time_offset = seek * TIME_PRECISION / INPUT_STRIDE  # seconds, float64 as transformers' (seek*0.02)/2

    def at(position: int) -> float:  # a timestamp token's absolute time
        return time_offset + (tokens[position] - timestamp_begin) * TIME_PRECISION

    # the window ends with a lone timestamp after text: no speech after it, the window is done
    single_timestamp_ending = is_ts[-2:] == [False, True]
    # a segment ends at each pair of consecutive timestamps; a new one starts at the pair's second token
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]

    if cuts:
        if single_timestamp_ending:
            cuts.append(len(tokens))  # the text after the last pair is a complete segment too
        else:
            cuts[-1] += 1  # the last segment keeps both timestamps of its closing pair
        segments, last = [], 0
        for n, cut in enumerate(cuts):
            piece = tokens[last:cut]
            # a segment's end is its last token, except the last segment of a window that
            # continues: there the token before its closing pair's second timestamp
            end_index = last + len(piece) - (1 if n < len(cuts) - 1 or single_timestamp_ending else 2)
            segments.append(RawSegment(at(last), at(end_index), tuple(piece)))
            last = cut
        if single_timestamp_ending:
            advance = seek_num_frames
        else:
            # the tokens after the last pair are an unfinished segment: dropped, and the next
            # window starts at the last pair's time
            advance = (tokens[last - 2] - timestamp_begin) * INPUT_STRIDE
        return segments, advance

    # no pair: the whole decode is one segment, from the window's start to its last timestamp
    # (unless that is <|0.00|>) or, without one, to the window's end
    stamps = [i for i, t in enumerate(is_ts) if t]
    if stamps and tokens[stamps[-1]] != timestamp_begin:
        end = at(stamps[-1])
    else:
        end = time_offset + int(seek_num_frames * FEATURE_PRECISION / TIME_PRECISION) * TIME_PRECISION
    return [RawSegment(time_offset, end, tuple(tokens))], seek_num_frames


# ---------------------------------------------------------------------------------------------
# the reference window decoder


class ReferenceDecoder:
    """A `WindowDecode` on transformers' own `generate` (`GenerationMixin.generate`, the call
    Whisper's long-form generate makes per window) with Whisper's logits processors built as
    `_retrieve_logit_processors` builds them for one window. `num_beams` > 1: beam search at
    temperature 0 (a sampled decode stays a sample, as openai-whisper drops the beams for it)."""

    def __init__(self, bundle: WhisperBundle, num_beams: int = 1):
        self.bundle = bundle
        self.num_beams = num_beams
        self.ids = SpecialTokens.of(bundle)
        self.sot = bundle.settings.decoder_start_token_id

    def processors(self, begin_index: int, timestamps: bool):
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            SuppressTokensAtBeginLogitsProcessor,
            SuppressTokensLogitsProcessor,
            WhisperTimeStampLogitsProcessor,
        )

        config, device = self.bundle.generation_config, self.bundle.model.device
        # transformers' order: begin-suppression, suppression, then the timestamp rules (whose
        # "timestamps more likely than any text token" rule reads the suppressed logits);
        # no-speech detection reads the raw logits, computed below instead
        processors = LogitsProcessorList()
        if config.begin_suppress_tokens:
            processors.append(SuppressTokensAtBeginLogitsProcessor(config.begin_suppress_tokens, begin_index, device=device))
        if config.suppress_tokens:
            processors.append(SuppressTokensLogitsProcessor(config.suppress_tokens, device=device))
        if timestamps:
            processors.append(WhisperTimeStampLogitsProcessor(config, begin_index=begin_index))
        return processors

    def __call__(self, hidden: torch.Tensor, prompt: list, temperature: float) -> WindowTokens:
        from transformers import GenerationMixin
        from transformers.modeling_outputs import BaseModelOutput

        from ..engine import ForwardCounter

        model = self.bundle.model
        config = copy.deepcopy(self.bundle.generation_config)
        # as generate_with_fallback sets them; the processors are ours, so the config's are cleared
        config.do_sample = temperature > 0
        config.temperature = temperature if config.do_sample else 1.0
        config.top_k = config.top_p = None
        config.num_beams = self.num_beams if temperature == 0 else 1
        config.suppress_tokens = config.begin_suppress_tokens = None
        config.max_new_tokens = None
        config.max_length = self.ids.max_positions  # prompt + generated ≤ 448, as the long-form loop sets it
        config.forced_decoder_ids = None
        config.return_dict_in_generate, config.output_scores, config.output_logits = True, True, True
        decoder_input_ids = torch.tensor([prompt], device=hidden.device)
        timestamps = prompt[-1] != self.ids.no_timestamps
        # (the long-form loop also passes an all-ones decoder_attention_mask when it prompts with
        # previous text: the logits are bitwise the same without it, checked on tiny.en)
        with ForwardCounter(model.get_decoder()) as counter, torch.inference_mode():
            out = GenerationMixin.generate(
                model,
                encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                decoder_input_ids=decoder_input_ids,
                generation_config=config,
                logits_processor=self.processors(len(prompt), timestamps),
                suppress_tokens=None,
                begin_suppress_tokens=None,
            )
            tokens = out.sequences[0, len(prompt):].tolist()
            # the no-speech probability: raw logits at <|startoftranscript|>. When that is the last
            # prompt token (.en models) they are the first step's logits; otherwise transformers
            # runs the decoder over the prompt once more (WhisperNoSpeechDetection), and so do we.
            sot_index = len(prompt) - 1 - prompt[::-1].index(self.sot)
            if sot_index == len(prompt) - 1:
                sot_logits = out.logits[0][0]
            else:
                sot_logits = model(encoder_outputs=(hidden,), decoder_input_ids=decoder_input_ids).logits[0, sot_index]
        no_speech_prob = sot_logits.float().softmax(-1)[self.ids.no_speech].item()
        # transformers' _retrieve_avg_logprobs: the stored scores are the processed logits divided
        # by the temperature; multiplied back, log-softmax, at the generated token
        rescale = temperature if temperature > 0 else 1
        if config.num_beams > 1:
            # the kept beam's own steps: log-softmax of the processed logits at its tokens
            steps = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
            token_logprobs = steps[0, : len(tokens)].float().tolist()
        else:
            token_logprobs = [
                torch.log_softmax((score[0] * rescale).float(), dim=-1)[token].item()
                for score, token in zip(out.scores, tokens, strict=True)
            ]
        return WindowTokens(tokens, token_logprobs, no_speech_prob, counter.calls, {1: len(tokens)})


# ---------------------------------------------------------------------------------------------
# the loop


def transcribe_features(
    bundle: WhisperBundle,
    features: torch.Tensor,
    options: Optional[LongFormOptions] = None,
    decode: Optional[WindowDecode] = None,
    *,
    duration: Optional[float] = None,
    progress: Optional[Callable[[float], None]] = None,
    waveform: Optional[np.ndarray] = None,
    on_segment: Optional[Callable[[Segment], None]] = None,
) -> Transcription:
    """The sequential long-form loop over log-mel `features` [1, n_mels, frames] (`long_form_features`).
    `decode`: the window decoder (default: `ReferenceDecoder`, transformers' generate);
    `progress(seconds)`: told how far into the audio the loop is after every window;
    `waveform`: the audio, to skip windows of digital silence (`SILENCE_PEAK`) undecoded;
    `on_segment(segment)`: told every segment as soon as its window is decoded."""
    options = options or LongFormOptions()
    decode = decode or ReferenceDecoder(bundle)
    ids = SpecialTokens.of(bundle)
    language = validate_language(bundle, options.language)
    if options.task == "translate" and not is_multilingual(bundle):
        raise ValueError(f"{bundle.name} is an English-only model: it cannot translate")
    eot = ids.eot
    max_frames = features.shape[-1]  # transformers (batch of one): every frame given, padding included
    duration = max_frames * FEATURE_PRECISION if duration is None else duration

    counter = StatsCounter()
    # the conditioning context: the initial prompt's tokens, then every segment's tokens
    context: list[tuple[int, ...]] = []
    if options.initial_prompt:
        context.append(tuple(prompt_text_tokens(bundle, options.initial_prompt)))
    segments: list[Segment] = []
    condition = options.condition_on_previous_text
    init: Optional[list[int]] = None
    seek, windows, skipped = 0, 0, 0
    last_speech = 0.0  # end of the last word so far (word timestamps)
    while seek < max_frames:
        seek_num_frames = min(max_frames - seek, WINDOW_FRAMES)  # frames of audio in this window
        samples = None if waveform is None else waveform[seek * HOP : (seek + seek_num_frames) * HOP]
        # (`seek_num_frames` counts the feature extractor's padding of audio under 30 s: use the audio)
        too_short = waveform is not None and len(waveform) / HOP - seek < MIN_WINDOW_FRAMES
        if too_short or (samples is not None and (samples.size == 0 or np.abs(samples).max() < SILENCE_PEAK)):
            logger.debug("window at %.2f s is too short or digital silence; skipped", seek * FEATURE_PRECISION)
            seek += seek_num_frames
            skipped += 1
            continue
        t0 = time.perf_counter()
        hidden = encode_window(bundle, window_features(features, seek))
        if init is None:
            # the language is detected once, on the first window, as transformers does
            language = language or detect_language(bundle, hidden)
            init = initial_tokens(bundle, language, options.task, options.without_timestamps)
        t1 = time.perf_counter()

        # the prompt: previous text when conditioning (the initial prompt alone for the first
        # window), then <|startoftranscript|> ...
        if (condition and context) or (windows == 0 and context):
            prompt = previous_tokens(context, ids) + init
        else:
            # transformers gives the initial prompt to *every* unconditioned window (with
            # condition_on_prev_tokens=False or after a hot window); openai-whisper, and
            # transformers' own doc of prompt_condition_type="first-segment", to the first only
            prompt = list(init)
        decision = decode_with_fallback(decode, hidden, prompt, options, ids)
        for attempt in decision.attempts:
            counter.add(tokens=len(attempt.tokens), forward_calls=attempt.forward_calls, accepted=attempt.accepted)
        counter.encode_seconds += t1 - t0
        counter.decode_seconds += time.perf_counter() - t1
        windows += 1
        # condition the next window only on a cool decode: transformers' `temperature < 0.5`,
        # for the next window only (openai-whisper resets its prompt for good after `> 0.5`)
        condition = options.condition_on_previous_text and decision.temperature < 0.5

        if decision.skip:
            logger.debug("window at %.2f s: no speech (p=%.2f); skipped", seek * FEATURE_PRECISION, decision.decoded.no_speech_prob)
            seek += seek_num_frames
            skipped += 1
            if progress is not None:
                progress(min(seek * FEATURE_PRECISION, duration))
            continue
        tokens = list(decision.decoded.tokens)
        if tokens and tokens[-1] == eot:
            tokens.pop()
        pieces, advance = split_segments(tokens, seek, seek_num_frames, ids.timestamp_begin)
        found = [dict(start=piece.start, end=piece.end, tokens=piece.tokens, words=()) for piece in pieces]
        if options.word_timestamps:
            # the segments' times move to their words' where openai-whisper moves them; the
            # decoding itself (and `seek`) stays the reference's
            sot_sequence = initial_tokens(bundle, language or "en", options.task, without_timestamps=True)[:-1]
            last_speech = add_word_timestamps(
                bundle, hidden, sot_sequence, found, seek_num_frames, seek * FEATURE_PRECISION, last_speech,
                language or "en",
            )
        for piece in found:
            context.append(piece["tokens"])
            segments.append(
                Segment(
                    start=piece["start"],
                    end=piece["end"],
                    text=bundle.vocabulary.decode([t for t in piece["tokens"] if t < eot]).strip(),
                    tokens=piece["tokens"],
                    avg_logprob=decision.avg_logprob,
                    compression_ratio=decision.compression_ratio,
                    no_speech_prob=decision.decoded.no_speech_prob,
                    temperature=decision.temperature,
                    words=piece["words"],
                )
            )
        if on_segment is not None:
            for segment in segments[len(segments) - len(pieces) :]:
                on_segment(segment)
        seek += advance
        if progress is not None:
            progress(min(seek * FEATURE_PRECISION, duration))

    all_tokens = tuple(t for s in segments for t in s.tokens)
    return Transcription(
        text=bundle.vocabulary.decode([t for t in all_tokens if t < eot]).strip(),
        tokens=all_tokens,
        language=language or "en",
        segments=tuple(segments),
        duration=duration,
        windows=windows,
        skipped=skipped,
        stats=counter.stats(),
    )


def transcribe_long_form(
    audio: AudioInput,
    bundle: WhisperBundle,
    options: Optional[LongFormOptions] = None,
    decode: Optional[WindowDecode] = None,
    progress: Optional[Callable[[float], None]] = None,
    on_segment: Optional[Callable[[Segment], None]] = None,
) -> Transcription:
    """Transcribe audio of any length with Whisper's sequential algorithm (see the module doc).
    `audio`: a path FFmpeg reads or a 16 kHz mono float32 array; `decode`: the window decoder
    (default: `ReferenceDecoder`, transformers' generate)."""
    waveform = load_audio(audio)
    t0 = time.perf_counter()
    features = long_form_features(bundle, waveform)
    feature_seconds = time.perf_counter() - t0
    result = transcribe_features(
        bundle, features, options, decode, duration=len(waveform) / SAMPLE_RATE, progress=progress, waveform=waveform,
        on_segment=on_segment,
    )
    stats = dataclasses.replace(result.stats, encode_seconds=result.stats.encode_seconds + feature_seconds)
    return dataclasses.replace(result, stats=stats)

"""`transcribe()`: audio of any length → a typed `Transcription`, in steps.

    window source   `windows()`: the audio's 30 s windows that hold sound
    window decode   `WindowDecoder`: encoder, language, prompt, then our loop or the reference
    segments        `segment_of()`: a decoded window → a `Segment`
    stats           `results.StatsCounter`: the counters of every window → `DecodingStats`

The options are one frozen dataclass, `TranscribeOptions`, shared with the CLI (its flags are
made from the fields).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator, Optional, Union

import numpy as np
import torch

from ..audio import CHUNK_SAMPLES, SAMPLE_RATE, AudioInput, load_audio
from ..decoding import DecodeOptions
from ..engine import default_gamma, sampling_generator
from ..lora import AdaptedModel, AdapterArgument, resolve_adapter
from ..results import Segment, StatsCounter, Transcription
from .decode import decode_window, decoder_prompt, detect_language, encode, generate_greedy, special_id, validate_language
from .loading import WhisperBundle, load_whisper

logger = logging.getLogger(__name__)

# Peak amplitude below which a window is digital silence (about -80 dBFS): Whisper tends to
# hallucinate a phrase on pure silence, so such a window is not decoded at all.
SILENCE_PEAK = 1e-4

# Draft slots per call when the caller does not choose: on a CPU a block's cost grows with its
# size, so a few slots are fastest (measured: see the adapter card); on a GPU a call costs nearly
# the same for 1 or 17 tokens, so the γ that drafts the most tokens per forward wins: the shipped
# adapters were trained on γ = 4 blocks and draft best there (tiny.en test-clean 1.89 at γ = 4
# against 1.46 at γ = 16, base 1.65 against 1.34 before its retraining: see the cards).
DEFAULT_GAMMA = {"cpu": 3, "cuda": 4}

MAX_NEW_TOKENS = 448  # per window; capped further by the model's positions after the prompt


@dataclass(frozen=True)
class TranscribeOptions:
    """How `transcribe()` decodes; the CLI's flags are made from these fields (metadata: help)."""

    # draft slots verified per forward call (0 = no drafting); None → DEFAULT_GAMMA for the device
    gamma: Optional[int] = field(default=None, metadata={
        "help": "draft slots per forward call (default: 3 on a CPU, 4 on a GPU)"})
    # EMA factor of the energy test, in [0, 1); 0 with tau=0 is lossless
    beta: float = field(default=0.0, metadata={"help": "EMA factor in [0, 1); 0 = lossless (default)"})
    # energy floor, ≤ 0; more negative accepts more drafts (lossy, faster)
    tau: float = field(default=0.0, metadata={"help": "energy floor ≤ 0; 0 = lossless (default)"})
    # draft from blank branches: more tokens per call for (γ+1)² more tokens in it
    blank_branches: bool = field(default=False, metadata={
        "help": "draft from blank branches: more tokens per call for (γ+1)² more tokens in it (worth it on a GPU)"})
    # 0 = greedy; > 0 samples (lossless mode keeps the base model's distribution)
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy (default)"})
    # language code; None detects it per window for multilingual models ("en" for .en models)
    language: Optional[str] = field(default=None, metadata={
        "help": "language code (default: detect; 'en' for .en models)"})
    # seeds the sampler (temperature > 0) for reproducible output
    seed: Optional[int] = field(default=None, metadata={"help": "seed for sampling (temperature > 0)"})

    def __post_init__(self):
        self.decode_options("cpu")  # refuse bad values before anything is loaded

    def decode_options(self, device) -> DecodeOptions:
        """The core loop's options on `device` (γ resolved)."""
        gamma = self.gamma if self.gamma is not None else default_gamma(DEFAULT_GAMMA, device)
        return DecodeOptions(
            gamma=gamma, beta=self.beta, tau=self.tau, temperature=self.temperature,
            max_new_tokens=MAX_NEW_TOKENS, blank_branches=self.blank_branches,
        )


@lru_cache(maxsize=4)
def _cached_bundle(name: str, device: str, dtype: torch.dtype) -> WhisperBundle:
    # transcribe() is often called in a loop over files: load (and convert) a model once
    return load_whisper(name, device=device, dtype=dtype)


def get_bundle(
    model: Union[str, WhisperBundle], *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> WhisperBundle:
    if isinstance(model, WhisperBundle):
        return model
    if not isinstance(model, str):
        raise TypeError(f"model must be a name, a path or a WhisperBundle, not {type(model).__name__}")
    return _cached_bundle(model, str(device), dtype)


def windows(waveform: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first sample, samples) of each 30 s window that is not digital silence."""
    for start in range(0, len(waveform), CHUNK_SAMPLES):
        window = waveform[start : start + CHUNK_SAMPLES]
        if np.abs(window).max() < SILENCE_PEAK:
            logger.debug("window at %.1f s is silent; skipped", start / SAMPLE_RATE)
            continue
        yield start, window


@dataclass(frozen=True)
class DecodedWindow:
    language: str  # the window's language (given or detected)
    tokens: list[int]  # generated tokens, end-of-text included when produced
    forward_calls: int  # decoder forward calls
    accepted: dict  # tokens committed per call → calls
    encode_seconds: float  # features + encoder (+ language detection)
    decode_seconds: float  # the decoding loop


class WindowDecoder:
    """Decodes one window: encoder, language, prompt, then cross-regressive decoding (with an
    adapter), our own plain loop (no adapter, or γ = 0) or transformers' `generate` (the
    reference: `adapter=None` with γ > 0)."""

    def __init__(
        self, bundle: WhisperBundle, adapted: Optional[AdaptedModel], options: TranscribeOptions, *,
        reference: bool, device,
    ):
        self.bundle, self.adapted, self.reference = bundle, adapted, reference
        self.language = validate_language(bundle, options.language)
        self.options = options.decode_options(device)
        self.temperature = options.temperature
        self.generator = sampling_generator(options.temperature, options.seed, device, reference=reference)

    def __call__(self, window: np.ndarray) -> DecodedWindow:
        t0 = time.perf_counter()
        hidden = encode(self.bundle, window)
        language = self.language or detect_language(self.bundle, hidden)
        prompt = decoder_prompt(self.bundle, language)
        t1 = time.perf_counter()
        if self.reference:
            tokens, calls = generate_greedy(self.bundle, hidden, prompt, temperature=self.temperature)
            accepted = {1: calls}
        else:
            result = decode_window(
                self.bundle, hidden, prompt, adapted=self.adapted, options=self.options, generator=self.generator
            )
            tokens, calls, accepted = result.tokens, result.forward_calls, dict(result.accepted)
        return DecodedWindow(language, tokens, calls, accepted, t1 - t0, time.perf_counter() - t1)


def segment_of(bundle: WhisperBundle, decoded: DecodedWindow, start: int, duration: float) -> Optional[Segment]:
    """The segment of a window decoded from sample `start` on; None when it holds no text."""
    text_ids = text_tokens(bundle, decoded.tokens)
    text = bundle.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
    if not text:
        return None
    return Segment(
        start=start / SAMPLE_RATE,
        end=min((start + CHUNK_SAMPLES) / SAMPLE_RATE, duration),
        text=text,
        tokens=tuple(text_ids),
    )


def text_tokens(bundle: WhisperBundle, tokens: list[int]) -> list[int]:
    """The text of decoded tokens: end-of-text and every special token (their ids follow it) dropped."""
    eot = special_id(bundle, "<|endoftext|>")
    return [t for t in tokens if t < eot]


def transcribe(
    audio: AudioInput,
    *,
    model: Union[str, WhisperBundle] = "tiny.en",
    adapter: AdapterArgument = "auto",
    device: str = "cpu",
    options: Optional[TranscribeOptions] = None,
    **decoding,
) -> Transcription:
    """Transcribe speech with Whisper.

    audio: a path to any audio or video file FFmpeg reads, or a 16 kHz mono float32 array.
    model: a bundled name ("tiny.en", "base"), a Hugging Face id or directory, a faster-whisper
        (CTranslate2) directory, or an already loaded `WhisperBundle`.
    adapter: "auto" (default) → the adapter shipped for these base weights, cross-regressive
        decoding (lossless unless beta/tau say otherwise); where none ships, crosswhisper's own
        autoregressive loop (token-identical to greedy). A peft adapter directory or loaded
        `AdaptedModel` → cross-regressive decoding with it. None → the plain reference decode,
        transformers `generate` (with gamma=0: our own autoregressive loop).
    device: torch device for the model ("cpu", "cuda").
    options: a `TranscribeOptions`; or its fields as keywords (`gamma`, `beta`, `tau`,
        `blank_branches`, `temperature`, `language`, `seed`: see `TranscribeOptions`).
        `blank_branches` drafts more tokens per forward call (base: 2.2 → 2.6, test-clean
        2.3 → 2.7 at γ = 4) for (γ+1)² more tokens in every call: worth it only where a call costs
        about the same for more tokens (a GPU); on a CPU it is slower. Exactness is unchanged.
    """
    if options is not None and decoding:
        raise TypeError("pass either options= or its fields as keywords, not both")
    options = options or TranscribeOptions(**decoding)  # validated before any loading
    gamma = options.decode_options(device).gamma
    if adapter is not None and gamma < 1:
        logger.info("gamma=0: no drafting, our own autoregressive loop")
    waveform = load_audio(audio)
    bundle = get_bundle(model, device=device)
    validate_language(bundle, options.language)  # before an adapter is loaded
    decode_one = WindowDecoder(
        bundle, resolve_adapter(bundle, adapter), options, reference=adapter is None and gamma > 0, device=device
    )

    duration = len(waveform) / SAMPLE_RATE
    counter = StatsCounter()
    segments: list[Segment] = []
    tokens: list[int] = []
    detected: Optional[str] = decode_one.language
    for start, window in windows(waveform):
        decoded = decode_one(window)
        detected = detected or decoded.language
        counter.add(tokens=len(decoded.tokens), forward_calls=decoded.forward_calls, accepted=decoded.accepted)
        counter.encode_seconds += decoded.encode_seconds
        counter.decode_seconds += decoded.decode_seconds
        segment = segment_of(bundle, decoded, start, duration)
        tokens += text_tokens(bundle, decoded.tokens)
        if segment is not None:
            segments.append(segment)

    return Transcription(
        text=" ".join(s.text for s in segments),
        tokens=tuple(tokens),
        language=detected or "en",
        segments=tuple(segments),
        duration=duration,
        stats=counter.stats(),
    )


def option_fields() -> tuple[dataclasses.Field, ...]:
    """The fields of `TranscribeOptions` (the CLI makes a flag of each)."""
    return dataclasses.fields(TranscribeOptions)


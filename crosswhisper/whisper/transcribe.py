"""`transcribe()`: audio of any length → a typed `Transcription`, by Whisper's sequential
long-form algorithm (`longform.py`), each window decoded by our loop with drafts (or, as the
reference, by transformers' `generate`).

The options are one frozen dataclass, `TranscribeOptions` (the long-form options plus how to
draft), shared with the CLI: its flags are made from the fields.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional, Union

import torch

from ..audio import AudioInput
from ..decoding import DecodeOptions
from ..engine import default_gamma, sampling_generator
from ..lora import AdaptedModel, AdapterArgument, resolve_adapter
from ..results import Segment, Transcription
from .decode import decode_window, validate_language
from .loading import COMPUTE_TYPES, WhisperBundle, load_whisper, with_compute_type
from .longform import LongFormOptions, ReferenceDecoder, WindowTokens, transcribe_long_form

logger = logging.getLogger(__name__)

# Draft slots per call when the caller does not choose: on a CPU a block's cost grows with its
# size, so a few slots are fastest (measured: see the adapter card); on a GPU a call costs nearly
# the same for 1 or 17 tokens, so the γ that drafts the most tokens per forward wins: the shipped
# adapters were trained on γ = 4 blocks and draft best there (tiny.en test-clean 1.89 at γ = 4
# against 1.46 at γ = 16, base 1.65 against 1.34 before its retraining: see the cards).
DEFAULT_GAMMA = {"cpu": 3, "cuda": 4}

# tokens generated per window at most: a window stops where prompt + tokens fill the decoder's
# 448 positions, as transformers' long-form generate does
MAX_NEW_TOKENS = 448


@dataclass(frozen=True)
class TranscribeOptions(LongFormOptions):
    """How `transcribe()` decodes: Whisper's long-form options (`LongFormOptions`: temperatures
    and fallback thresholds, previous-text conditioning, initial prompt, timestamps, task,
    language) and how the drafts are verified. The CLI makes a flag of each field (metadata: help)."""

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
    # beams of the temperature-0 decode; > 1 runs transformers' beam search (not accelerated)
    beam_size: int = field(default=1, metadata={
        "help": "beam search with this many beams at temperature 0 (default 1: greedy, drafted; "
                "> 1 runs transformers' beam search, not accelerated)"})
    # how the encoder and the vocabulary projection multiply (loading.COMPUTE_TYPES); lossless
    # drafting is token-identical to greedy (gamma=0) at the same compute type
    compute_type: str = field(default="float32", metadata={
        "help": "float32 (default); bfloat16: encoder and vocabulary projection in bfloat16 "
                "(fast on CPUs with AMX/AVX-512-BF16), the rest float32; int8: the encoder's linear "
                "layers and the vocabulary projection with int8 weights and activations (on CPUs below "
                "AVX-512: the vocabulary projection only, through fbgemm)", "choices": COMPUTE_TYPES})
    # seeds the sampler of the fallback temperatures (> 0) for reproducible output
    seed: Optional[int] = field(default=None, metadata={"help": "seed for sampling (temperatures > 0)"})

    def __post_init__(self):
        super().__post_init__()
        if self.compute_type not in COMPUTE_TYPES:
            raise ValueError(f"compute_type must be one of {', '.join(COMPUTE_TYPES)}, not {self.compute_type!r}")
        if int(self.beam_size) != self.beam_size or self.beam_size < 1:
            raise ValueError(f"beam_size must be an integer ≥ 1, not {self.beam_size!r}")
        self.decode_options("cpu")  # refuse bad values before anything is loaded

    def decode_options(self, device) -> DecodeOptions:
        """The core loop's options on `device` (γ resolved; the temperature is set per attempt)."""
        gamma = self.gamma if self.gamma is not None else default_gamma(DEFAULT_GAMMA, device)
        return DecodeOptions(
            gamma=gamma, beta=self.beta, tau=self.tau, temperature=max(self.temperature),
            max_new_tokens=MAX_NEW_TOKENS, blank_branches=self.blank_branches, token_logprobs=True,
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


def option_fields() -> tuple[dataclasses.Field, ...]:
    """The fields of `TranscribeOptions` (the CLI makes a flag of each)."""
    return dataclasses.fields(TranscribeOptions)


class BeamSearchDecoder:
    """beam_size > 1: transformers' beam search for temperature 0, `sampled` for the fallback
    temperatures (openai-whisper's rule: beams at 0, sampling above)."""

    def __init__(self, beams: ReferenceDecoder, sampled):
        self.beams, self.sampled = beams, sampled

    def __call__(self, hidden: torch.Tensor, prompt: list, temperature: float) -> WindowTokens:
        return (self.beams if temperature == 0 else self.sampled)(hidden, prompt, temperature)


class DraftingDecoder:
    """The long-form loop's window decoder (`longform.WindowDecode`) on our loop: cross-regressive
    with an adapter (γ ≥ 1), our own plain loop without one (or with γ = 0)."""

    def __init__(self, bundle: WhisperBundle, adapted: Optional[AdaptedModel], options: DecodeOptions, generator):
        self.bundle, self.adapted, self.options, self.generator = bundle, adapted, options, generator

    def __call__(self, hidden: torch.Tensor, prompt: list, temperature: float) -> WindowTokens:
        options = dataclasses.replace(self.options, temperature=temperature)
        result = decode_window(
            self.bundle, hidden, prompt, adapted=self.adapted, options=options, generator=self.generator
        )
        return WindowTokens(
            tokens=result.tokens, token_logprobs=result.token_logprobs, no_speech_prob=result.no_speech_prob,
            forward_calls=result.forward_calls, accepted=dict(result.accepted),
        )


def transcribe(
    audio: AudioInput,
    *,
    model: Union[str, WhisperBundle] = "tiny.en",
    adapter: AdapterArgument = "auto",
    device: str = "cpu",
    options: Optional[TranscribeOptions] = None,
    progress: Optional[Callable[[float], None]] = None,
    on_segment: Optional[Callable[[Segment], None]] = None,
    batch_size: Optional[int] = None,
    **decoding,
) -> Transcription:
    """Transcribe speech of any length with Whisper's sequential long-form algorithm (or, with
    `batch_size`, the batched pipeline).

    audio: a path to any audio or video file FFmpeg reads, or a 16 kHz mono float32 array.
    model: a bundled name ("tiny.en", "base"), a Hugging Face id or directory, a faster-whisper
        (CTranslate2) directory, or an already loaded `WhisperBundle`.
    adapter: "auto" (default) → the adapter shipped for these base weights, cross-regressive
        decoding (lossless unless beta/tau say otherwise); where none ships, crosswhisper's own
        autoregressive loop (token-identical to greedy). A peft adapter directory or loaded
        `AdaptedModel` → cross-regressive decoding with it. None → the plain reference decode of
        every window, transformers `generate` (with gamma=0: our own autoregressive loop).
    device: torch device for the model ("cpu", "cuda").
    options: a `TranscribeOptions`; or its fields as keywords: `temperature` (a value or the
        fallback sequence, default 0.0, 0.2, … 1.0), `compression_ratio_threshold` (2.4),
        `logprob_threshold` (-1.0), `no_speech_threshold` (0.6), `condition_on_previous_text`
        (True), `initial_prompt`, `without_timestamps` (False), `task` ("transcribe" or
        "translate"), `language` (None: detected on the first window), `gamma`, `beta`, `tau`,
        `blank_branches`, `beam_size` (1; > 1 is transformers' beam search, not accelerated),
        `word_timestamps` (False), `seed`: see `TranscribeOptions` and `LongFormOptions`.
        `blank_branches` drafts more tokens per forward call for (γ+1)² more tokens in every
        call: worth it only where a call costs about the same for more tokens (a GPU).
    progress: called with the seconds of audio done after every window.
    on_segment: called with every segment as soon as its window is decoded (streaming output).
    batch_size: None (default): the sequential algorithm. A number: the batched pipeline
        (`batched.transcribe_batch`): speech found by a voice-activity detector, cut at pauses
        into ≤ 30 s chunks decoded `batch_size` at a time, independently (no previous-text
        prompt, as faster-whisper's `BatchedInferencePipeline`); faster on long audio.
    """
    if options is not None and decoding:
        raise TypeError("pass either options= or its fields as keywords, not both")
    options = options or TranscribeOptions(**decoding)  # validated before any loading
    if batch_size is not None:
        from .batched import transcribe_batch

        result = transcribe_batch(
            [audio], model=model, adapter=adapter, device=device, batch_size=batch_size, options=options,
            progress=progress,
        )[0]
        for segment in result.segments if on_segment is not None else ():
            on_segment(segment)
        return result
    decode_options = options.decode_options(device)
    if adapter is not None and decode_options.gamma < 1:
        logger.info("gamma=0: no drafting, our own autoregressive loop")
    bundle = with_compute_type(get_bundle(model, device=device), options.compute_type)
    validate_language(bundle, options.language)  # before an adapter is loaded
    reference = adapter is None and decode_options.gamma > 0
    generator = sampling_generator(max(options.temperature), options.seed, device, reference=reference)
    if reference:
        decode = ReferenceDecoder(bundle)
    else:
        decode = DraftingDecoder(bundle, resolve_adapter(bundle, adapter), decode_options, generator)
    if options.beam_size > 1:
        logger.info("beam_size=%d: the temperature-0 decode runs transformers' beam search, not drafted", options.beam_size)
        decode = BeamSearchDecoder(ReferenceDecoder(bundle, num_beams=options.beam_size), decode)
    return transcribe_long_form(audio, bundle, options, decode, progress=progress, on_segment=on_segment)

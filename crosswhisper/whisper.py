"""Whisper specifics: 30-second windows, prompts, logits processing and `transcribe()`.

`transcribe()` cuts the audio into 30 s windows, runs the frozen encoder once per window and
decodes each window either with transformers' `generate` (``adapter=None``: the plain greedy
reference) or with cross-regressive decoding (`decoding.py` over `dual_stream.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .audio import CHUNK_SAMPLES, SAMPLE_RATE, AudioInput, load_audio
from .decoding import DecodeOptions, DecodingStats, decode
from .dual_stream import (
    ADAPTER_INFO_FILE,
    SHIPPED_ADAPTERS,  # a name of this module too: tests point it at another directory
    AdaptedModel,
    HFDualStream,
    StreamGate,
    find_shipped_adapter,
    load_adapter_for,
    resolve_adapter_argument,
)
from .models import WhisperBundle, load_whisper

logger = logging.getLogger(__name__)

# Peak amplitude below which a window is digital silence (about -80 dBFS): Whisper tends to
# hallucinate a phrase on pure silence, so such a window is not decoded at all.
SILENCE_PEAK = 1e-4


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the audio (the 30 s window's start)
    end: float  # seconds; the window's end, clipped to the audio's duration
    text: str  # decoded text of this window, stripped
    tokens: tuple[int, ...]  # generated token ids of this window (no prompt, no end-of-text)


@dataclass(frozen=True)
class Transcription:
    text: str  # the whole transcript
    tokens: tuple[int, ...]  # generated ids of all windows, in order (no prompts, no end-of-text)
    language: str  # language code, e.g. "en" (detected for multilingual models unless given)
    segments: tuple[Segment, ...]  # one per 30 s window that held speech
    duration: float  # audio length in seconds
    stats: DecodingStats = field(repr=False)  # counters and timings over all windows


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


def special_id(bundle: WhisperBundle, token: str) -> int:
    token_id = bundle.tokenizer.convert_tokens_to_ids(token)
    # unknown tokens map to the unk id (which is <|endoftext|> in Whisper): check the round trip
    if token_id is None or bundle.tokenizer.convert_ids_to_tokens(token_id) != token:
        raise ValueError(f"{bundle.name}: the tokenizer has no special token {token}")
    return token_id


def is_multilingual(bundle: WhisperBundle) -> bool:
    return bool(getattr(bundle.generation_config, "is_multilingual", False))


def decoder_prompt(bundle: WhisperBundle, language: Optional[str]) -> list[int]:
    """The tokens Whisper decodes after: <|startoftranscript|> [<|lang|> <|transcribe|>] <|notimestamps|>."""
    prompt = [special_id(bundle, "<|startoftranscript|>")]
    if is_multilingual(bundle):
        prompt += [special_id(bundle, f"<|{language}|>"), special_id(bundle, "<|transcribe|>")]
    prompt.append(special_id(bundle, "<|notimestamps|>"))
    return prompt


def detect_language(bundle: WhisperBundle, encoder_hidden_states: torch.Tensor) -> str:
    """Most probable language token after <|startoftranscript|>, as openai-whisper does."""
    if not is_multilingual(bundle):
        return "en"
    lang_to_id: dict[str, int] = bundle.generation_config.lang_to_id
    sot = torch.tensor([[special_id(bundle, "<|startoftranscript|>")]], device=encoder_hidden_states.device)
    with torch.inference_mode():
        logits = bundle.model(encoder_outputs=(encoder_hidden_states,), decoder_input_ids=sot).logits[0, -1]
    ids = torch.tensor(list(lang_to_id.values()), device=logits.device)
    best = ids[logits[ids].argmax()].item()
    token = next(tok for tok, i in lang_to_id.items() if i == best)
    return token.strip("<|>")


def validate_language(bundle: WhisperBundle, language: Optional[str]) -> Optional[str]:
    if language is None:
        return None
    language = language.lower()
    if not is_multilingual(bundle):
        if language != "en":
            raise ValueError(f"{bundle.name} is an English-only model; language={language!r} is not supported")
        return language
    known = sorted(tok.strip("<|>") for tok in bundle.generation_config.lang_to_id)
    if language not in known:
        raise ValueError(f"unknown language {language!r}; {bundle.name} knows: {', '.join(known)}")
    return language


def encode(bundle: WhisperBundle, window: np.ndarray) -> torch.Tensor:
    """Log-mel features of one ≤30 s window → encoder hidden states [1, frames, d_model]."""
    features = bundle.feature_extractor(window, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    features = features.to(bundle.model.device, bundle.model.dtype)
    with torch.inference_mode():
        return bundle.model.get_encoder()(features).last_hidden_state


class _ForwardCounter:
    """Counts decoder forward calls (generate() hides its loop)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def generate_greedy(
    bundle: WhisperBundle,
    encoder_hidden_states: torch.Tensor,
    prompt: list[int],
    *,
    temperature: float = 0.0,
) -> tuple[list[int], int]:
    """Reference decode: transformers' `generate`, no timestamps; greedy unless temperature > 0.
    Returns (generated tokens, decoder forward calls)."""
    from transformers.modeling_outputs import BaseModelOutput

    model = bundle.model
    config = copy.deepcopy(bundle.generation_config)  # generate() edits the config it is given
    config.do_sample = temperature > 0
    config.temperature = temperature if temperature > 0 else None
    config.num_beams = 1
    config.return_timestamps = False
    if is_multilingual(bundle):
        # the prompt names the language: without this, generate() runs its own detection call
        config.language = bundle.tokenizer.convert_ids_to_tokens(prompt[1]).strip("<|>")
        config.task = "transcribe"
    counter = _ForwardCounter(model.get_decoder())
    try:
        with torch.inference_mode():
            out = model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
                decoder_input_ids=torch.tensor([prompt], device=encoder_hidden_states.device),
                generation_config=config,
            )
    finally:
        counter.close()
    sequence = out.sequences[0] if hasattr(out, "sequences") else out[0]
    tokens = sequence.tolist()
    # generate() returns the prompt too; keep the generated part
    if tokens[: len(prompt)] == prompt:
        tokens = tokens[len(prompt) :]
    eot = special_id(bundle, "<|endoftext|>")
    while tokens and tokens[-1] == eot:  # padding after an early stop
        tokens.pop()
    if len(tokens) < counter.calls:
        tokens.append(eot)  # generate() drops the end-of-text that the last call produced
    return tokens, counter.calls



# LoRA on the decoder (DESIGN §1.3): self-attention, cross-attention to the audio features
# (queries and output: how the predictive stream reads the audio) and the MLP. The
# cross-attention keys/values of the audio stay the base model's, so both streams share them
# and training computes them once per utterance; the encoder stays frozen.
LORA_TARGET_MODULES = (
    r".*decoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|encoder_attn\.(q_proj|out_proj)|fc1|fc2)"
)


def shipped_adapter(model_name: str) -> Optional[Path]:
    """The adapter shipped in the package for a bundled model name, or None when there is none."""
    directory = SHIPPED_ADAPTERS / model_name
    return directory if (directory / "adapter_config.json").is_file() else None


def shipped_adapter_for(bundle: WhisperBundle) -> Optional[Path]:
    """The shipped adapter made for exactly these base weights (by checksum), whatever the
    model was called when loaded (bundled name, CTranslate2 directory, ...); None if none."""
    return find_shipped_adapter(bundle.weights_sha256, SHIPPED_ADAPTERS)


# Draft slots per call when the caller does not choose: on a CPU a block's cost grows with its
# size, so a few slots are fastest (measured: see the adapter card); on a GPU a call costs nearly
# the same for 1 or 17 tokens, so the γ that drafts the most tokens per forward wins: the shipped
# adapters were trained on γ = 4 blocks and draft best there (tiny.en test-clean 1.89 at γ = 4
# against 1.46 at γ = 16, base 1.65 against 1.34 before its retraining: see the cards).
# Not yet timed on a GPU.
DEFAULT_GAMMA = {"cpu": 3, "cuda": 4}


def default_gamma(device: str) -> int:
    return DEFAULT_GAMMA.get(torch.device(device).type, DEFAULT_GAMMA["cuda"])


def lora_config(rank: int = 32, alpha: Optional[int] = None, *, random_init: bool = False):
    """peft LoraConfig for the Whisper decoder; `random_init` gives a non-zero (untrained) delta."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        lora_dropout=0.0,
        target_modules=LORA_TARGET_MODULES,
        # peft's default makes B = 0 (the adapter starts as a no-op); random init is the
        # worst case for drafting and the honest test of exactness
        init_lora_weights=not random_init,
    )


def save_adapter(peft_model, directory, bundle: WhisperBundle, **card) -> None:
    """Save with peft's API plus a small record of the base weights it belongs to."""
    import json
    from pathlib import Path

    directory = Path(directory)
    peft_model.save_pretrained(str(directory))
    info = {"base_model": bundle.name, "base_weights_sha256": bundle.weights_sha256,
            "vocab_size": bundle.model.config.vocab_size, **card}
    (directory / ADAPTER_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def new_adapter(bundle: WhisperBundle, *, rank: int = 32, random_init: bool = False, seed: int = 0) -> AdaptedModel:
    """A fresh LoRA adapter on a copy of the base model (for training, and for exactness tests)."""
    import copy

    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(bundle.model), lora_config(rank, random_init=random_init))
    peft_model.eval()
    return AdaptedModel(peft_model=peft_model, gate=StreamGate(peft_model), source="<new>")


def load_adapter(bundle: WhisperBundle, adapter) -> AdaptedModel:
    """Load a peft adapter directory for `bundle`, refusing one made for other base weights."""
    return load_adapter_for(
        bundle.model, adapter, name=bundle.name, weights_sha256=bundle.weights_sha256,
        vocab_size=bundle.model.config.vocab_size,
    )


@lru_cache(maxsize=4)
def _cached_adapter(bundle: WhisperBundle, adapter: str) -> AdaptedModel:
    return load_adapter(bundle, adapter)


def resolve_adapter(
    bundle: WhisperBundle, adapter: Union[None, str, "os.PathLike", AdaptedModel]
) -> Optional[AdaptedModel]:
    """`transcribe`'s adapter argument → a loaded adapter, or None (no drafting).

    "auto" is the shipped adapter for these weights when there is one; a directory is loaded
    once per process (and refused if it was made for other base weights)."""
    return resolve_adapter_argument(
        adapter, name=bundle.name, shipped=lambda: shipped_adapter_for(bundle),
        load=lambda directory: _cached_adapter(bundle, directory),
    )


def logits_processor(bundle: WhisperBundle, prompt_length: int):
    """Whisper's processing of next-token logits, as `generate` applies it without timestamps:
    suppressed tokens everywhere, begin-suppressed tokens at the first generated position."""
    config = bundle.generation_config
    device = bundle.model.device
    suppress = torch.tensor(list(config.suppress_tokens or []), dtype=torch.long, device=device)
    begin = torch.tensor(list(config.begin_suppress_tokens or []), dtype=torch.long, device=device)

    def process(logits: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        if suppress.numel():
            logits[..., suppress] = -float("inf")
        if begin.numel():
            first = (token_index == prompt_length).nonzero().flatten()
            if first.numel():
                logits[:, first.unsqueeze(-1), begin] = -float("inf")
        return logits

    return process


def dual_streams(
    bundle: WhisperBundle,
    encoder_hidden_states: torch.Tensor,
    prompt_length: int,
    *,
    adapted: Optional[AdaptedModel],
    drafting: bool,
) -> HFDualStream:
    """Both streams of the decoder over one window (the base model's alone without an adapter)."""
    whisper = adapted.peft_model.base_model.model if adapted is not None else bundle.model
    return HFDualStream(
        whisper.model.decoder,
        whisper.proj_out,
        encoder_hidden_states,
        process_logits=logits_processor(bundle, prompt_length),
        gate=adapted.gate if adapted is not None else None,
        drafting=drafting,
        max_length=bundle.model.config.max_target_positions,
        placeholder_id=special_id(bundle, "<|endoftext|>"),
    )


def decode_window(
    bundle: WhisperBundle,
    encoder_hidden_states: torch.Tensor,
    prompt: list[int],
    *,
    adapted: Optional[AdaptedModel],
    options: DecodeOptions,
    generator: Optional[torch.Generator] = None,
):
    """Our decoding loop on one window: cross-regressive with an adapter (γ ≥ 1), else plain AR."""
    max_length = bundle.model.config.max_target_positions
    options = dataclasses.replace(options, max_new_tokens=min(options.max_new_tokens, max_length - len(prompt)))
    drafting = adapted is not None and options.gamma > 0
    streams = dual_streams(bundle, encoder_hidden_states, len(prompt), adapted=adapted, drafting=drafting)
    return decode(
        streams,
        prompt,
        options=dataclasses.replace(options, gamma=options.gamma if drafting else 0),
        eos_token_id=special_id(bundle, "<|endoftext|>"),
        placeholder_id=special_id(bundle, "<|endoftext|>"),
        generator=generator,
        device=encoder_hidden_states.device,
    )


def transcribe(
    audio: AudioInput,
    *,
    model: Union[str, WhisperBundle] = "tiny.en",
    adapter: Union[None, str, "os.PathLike", AdaptedModel] = "auto",
    gamma: Optional[int] = None,
    beta: float = 0.0,
    tau: float = 0.0,
    blank_branches: bool = False,
    temperature: float = 0.0,
    language: Optional[str] = None,
    seed: Optional[int] = None,
    device: str = "cpu",
) -> Transcription:
    """Transcribe speech with Whisper.

    audio: a path to any file soundfile/librosa can read, or a 16 kHz mono float32 array.
    model: a bundled name ("tiny.en", "base"), a Hugging Face id or directory, a faster-whisper
        (CTranslate2) directory, or an already loaded `WhisperBundle`.
    adapter: "auto" (default) → the adapter shipped for these base weights, cross-regressive
        decoding (lossless unless beta/tau say otherwise); where none ships, crosswhisper's own
        autoregressive loop (token-identical to greedy). A peft adapter directory or loaded
        `AdaptedModel` → cross-regressive decoding with it. None → the plain reference decode,
        transformers `generate` (with gamma=0: our own autoregressive loop).
    gamma: draft slots verified per forward call (0 = no drafting); None → `DEFAULT_GAMMA` for
        the device (3 on a CPU, 4 on a GPU).
    beta: EMA factor of the energy test, in [0, 1); 0 with tau=0 is lossless.
    tau: energy floor, ≤ 0; more negative accepts more drafts (lossy, faster).
    blank_branches: draft from blank branches (`DecodeOptions.blank_branches`): more tokens per
        forward call (base: 2.2 → 2.6, test-clean 2.3 → 2.7 at γ = 4) for (γ+1)² more tokens in
        every call, so only worth it where a call costs about the same for more tokens (a GPU);
        on a CPU it is slower. Exactness is unchanged.
    temperature: 0 = greedy; > 0 samples (lossless mode keeps the base model's distribution).
    language: language code; None detects it per window for multilingual models.
    seed: seeds the sampler (temperature > 0) for reproducible output.
    device: torch device for the model ("cpu", "cuda").
    """
    # validated before any loading; decode_window caps max_new_tokens at the model's positions
    if gamma is None:
        gamma = default_gamma(device)
    options = DecodeOptions(
        gamma=gamma, beta=beta, tau=tau, temperature=temperature, max_new_tokens=448, blank_branches=blank_branches
    )
    if adapter is not None and gamma < 1:
        logger.info("gamma=0: no drafting, our own autoregressive loop")
    waveform = load_audio(audio)
    bundle = get_bundle(model, device=device)
    language = validate_language(bundle, language)
    eot = special_id(bundle, "<|endoftext|>")
    use_generate = adapter is None and gamma > 0  # the reference path
    adapted = resolve_adapter(bundle, adapter)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
        if use_generate and seed is not None:
            torch.manual_seed(seed)  # generate() samples from the global generator

    segments: list[Segment] = []
    all_tokens: list[int] = []
    forward_calls = generated = 0
    accepted: Counter = Counter()
    encode_seconds = decode_seconds = 0.0
    detected: Optional[str] = language
    duration = len(waveform) / SAMPLE_RATE

    for start in range(0, len(waveform), CHUNK_SAMPLES):
        window = waveform[start : start + CHUNK_SAMPLES]
        if np.abs(window).max() < SILENCE_PEAK:
            logger.debug("window at %.1f s is silent; skipped", start / SAMPLE_RATE)
            continue
        t0 = time.perf_counter()
        hidden = encode(bundle, window)
        window_language = language or detect_language(bundle, hidden)
        detected = detected or window_language
        prompt = decoder_prompt(bundle, window_language)
        t1 = time.perf_counter()
        if use_generate:
            tokens, calls = generate_greedy(bundle, hidden, prompt, temperature=temperature)
            accepted[1] += calls
        else:
            result = decode_window(bundle, hidden, prompt, adapted=adapted, options=options, generator=generator)
            tokens, calls = result.tokens, result.forward_calls
            accepted.update(result.accepted)
        t2 = time.perf_counter()
        encode_seconds += t1 - t0
        decode_seconds += t2 - t1
        forward_calls += calls
        generated += len(tokens)
        text_tokens = [t for t in tokens if t < eot]  # drop end-of-text (special ids all follow it)
        all_tokens += text_tokens
        text = bundle.tokenizer.decode(text_tokens, skip_special_tokens=True).strip()
        if text:
            segments.append(
                Segment(
                    start=start / SAMPLE_RATE,
                    end=min((start + CHUNK_SAMPLES) / SAMPLE_RATE, duration),
                    text=text,
                    tokens=tuple(text_tokens),
                )
            )

    longest = max(accepted, default=0)
    stats = DecodingStats(
        forward_calls=forward_calls,
        generated_tokens=generated,
        tokens_per_forward=generated / forward_calls if forward_calls else 0.0,
        encode_seconds=encode_seconds,
        decode_seconds=decode_seconds,
        acceptance_histogram=tuple(accepted.get(i, 0) for i in range(1, longest + 1)),
    )
    return Transcription(
        text=" ".join(s.text for s in segments),
        tokens=tuple(all_tokens),
        language=detected or "en",
        segments=tuple(segments),
        duration=duration,
        stats=stats,
    )

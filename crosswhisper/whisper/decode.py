"""One 30-second window of Whisper: features, prompt, language, logits processing, decoding.

Everything `transcribe()` does per window lives here: the log-mel features and the frozen
encoder, the decoder prompt, language detection, Whisper's logits processing as a function of
each position, both streams of the decoder (`dual_stream.HFDualStream`) and the cross-regressive
loop over them (`decoding.decode`), or transformers' `generate` as the reference.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from ..audio import SAMPLE_RATE
from ..decoding import DecodeOptions, DecodeResult
from ..dual_stream import HFDualStream
from ..engine import ForwardCounter, decode_prompt, reference_generation_config
from ..lora import AdaptedModel
from .loading import WhisperBundle

logger = logging.getLogger(__name__)


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
    config = reference_generation_config(bundle.generation_config, temperature=temperature, return_timestamps=False)
    if is_multilingual(bundle):
        # the prompt names the language: without this, generate() runs its own detection call
        config.language = bundle.tokenizer.convert_ids_to_tokens(prompt[1]).strip("<|>")
        config.task = "transcribe"
    with ForwardCounter(model.get_decoder()) as counter, torch.inference_mode():
        out = model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
            decoder_input_ids=torch.tensor([prompt], device=encoder_hidden_states.device),
            generation_config=config,
        )
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


# Draft slots per call when the caller does not choose: on a CPU a block's cost grows with its
# size, so a few slots are fastest (measured: see the adapter card); on a GPU a call costs nearly
# the same for 1 or 17 tokens, so the γ that drafts the most tokens per forward wins: the shipped
# adapters were trained on γ = 4 blocks and draft best there (tiny.en test-clean 1.89 at γ = 4
# against 1.46 at γ = 16, base 1.65 against 1.34 before its retraining: see the cards).
# Not yet timed on a GPU.
DEFAULT_GAMMA = {"cpu": 3, "cuda": 4}


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
) -> DecodeResult:
    """Our decoding loop on one window: cross-regressive with an adapter (γ ≥ 1), else plain AR."""
    eot = special_id(bundle, "<|endoftext|>")
    return decode_prompt(
        prompt,
        streams=lambda drafting: dual_streams(bundle, encoder_hidden_states, len(prompt), adapted=adapted, drafting=drafting),
        drafting_possible=adapted is not None,
        options=options,
        max_length=bundle.model.config.max_target_positions,
        eos_token_id=eot,
        placeholder_id=eot,
        generator=generator,
        device=encoder_hidden_states.device,
    )

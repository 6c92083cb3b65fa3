"""One 30-second window of Whisper: features, prompt, language, logits processing, decoding.

Everything `transcribe()` does per window lives here: the log-mel features and the frozen
encoder, the decoder prompt, language detection, Whisper's logits processing as a function of
each position, both streams of the decoder (`streams.WhisperStreams`, one row on a static cache;
`dual_stream.HFDualStream` for blank branches) and the cross-regressive loop over them (`decoding.decode`), or transformers' `generate` as the reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..decoding import DecodeOptions, DecodeResult
from ..dual_stream import ExactArgmax, HFDualStream
from ..engine import ForwardCounter, decode_prompts, reference_generation_config
from ..lora import AdaptedModel
from .loading import WhisperBundle, run_encoder
from .streams import WhisperStreams, supported

logger = logging.getLogger(__name__)


def special_id(bundle: WhisperBundle, token: str) -> int:
    token_id = bundle.vocabulary.token_to_id(token)
    if token_id is None:
        raise ValueError(f"{bundle.name}: the tokenizer has no special token {token}")
    return token_id


def is_multilingual(bundle: WhisperBundle) -> bool:
    return bundle.settings.is_multilingual


def decoder_prompt(
    bundle: WhisperBundle, language: Optional[str], *, task: str = "transcribe", timestamps: bool = False
) -> list[int]:
    """The tokens Whisper decodes after: <|startoftranscript|> [<|lang|> <|task|>], then
    <|notimestamps|> unless the window is decoded with timestamps. English-only models take
    neither a language nor a task."""
    if task not in ("transcribe", "translate"):
        raise ValueError(f"task must be 'transcribe' or 'translate', got {task!r}")
    prompt = [special_id(bundle, "<|startoftranscript|>")]
    if is_multilingual(bundle):
        prompt += [special_id(bundle, f"<|{language}|>"), special_id(bundle, f"<|{task}|>")]
    elif task == "translate":
        raise ValueError(f"{bundle.name} is an English-only model: it cannot translate")
    if not timestamps:
        prompt.append(special_id(bundle, "<|notimestamps|>"))
    return prompt


def detect_language(bundle: WhisperBundle, encoder_hidden_states: torch.Tensor) -> str:
    """Most probable language token after <|startoftranscript|>, as openai-whisper does."""
    if not is_multilingual(bundle):
        return "en"
    lang_to_id: dict[str, int] = bundle.settings.lang_to_id
    weights = bundle.weights
    # the control stream over <|startoftranscript|> (transformers' forward, bit for bit)
    streams = WhisperStreams(weights.decoder, weights.proj_out, encoder_hidden_states, process_logits=None,
                             drafting=False, max_length=weights.config.max_target_positions)
    logits = streams.teacher_force([special_id(bundle, "<|startoftranscript|>")], capture={})[-1]
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
    known = sorted(tok.strip("<|>") for tok in bundle.settings.lang_to_id)
    if language not in known:
        raise ValueError(f"unknown language {language!r}; {bundle.name} knows: {', '.join(known)}")
    return language


def encode(bundle: WhisperBundle, window: np.ndarray) -> torch.Tensor:
    """Log-mel features of one ≤30 s window → encoder hidden states [1, frames, d_model]."""
    return run_encoder(bundle, bundle.log_mel([window]))


def generate_greedy(
    bundle: WhisperBundle,
    encoder_hidden_states: torch.Tensor,
    prompt: list[int],
    *,
    temperature: float = 0.0,
    timestamps: bool = False,
) -> tuple[list[int], int]:
    """Reference decode: transformers' `generate`, no timestamps; greedy unless temperature > 0.
    Returns (generated tokens, decoder forward calls)."""
    from transformers.modeling_outputs import BaseModelOutput

    model = bundle.model
    config = reference_generation_config(
        bundle.generation_config, temperature=temperature, return_timestamps=timestamps
    )
    if is_multilingual(bundle):
        # the prompt names the language: without this, generate() runs its own detection call
        config.language = bundle.vocabulary.id_to_token(prompt[1]).strip("<|>")
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


def logits_processor(bundle: WhisperBundle, prompt_length: int, *, timestamps: bool = False):
    """Whisper's processing of next-token logits, in `generate`'s order: begin-suppressed tokens
    at the first generated position, suppressed tokens everywhere, then (`timestamps`) the
    timestamp rules. The rules depend on the tokens generated before each position, so they are
    computed from each position's own prefix (in a block: the drafts before it, DESIGN §1.5);
    the same function serves the control and the predictive stream."""
    config = bundle.settings
    device = bundle.weights.device
    suppress = torch.tensor(list(config.suppress_tokens or []), dtype=torch.long, device=device)
    begin = torch.tensor(list(config.begin_suppress_tokens or []), dtype=torch.long, device=device)
    no_timestamps = config.no_timestamps_token_id
    timestamp_begin = no_timestamps + 1
    eot = special_id(bundle, "<|endoftext|>")
    max_initial = getattr(config, "max_initial_timestamp_index", None)
    inf = float("inf")

    def timestamp_rules(logits: torch.Tensor, token_index: torch.Tensor, tokens: torch.Tensor) -> None:
        logits[..., no_timestamps] = -inf  # timestamp mode: never <|notimestamps|>
        sequence = tokens.tolist()
        for k, index in enumerate(token_index.tolist()):
            generated = sequence[prompt_length:index]
            last_was_timestamp = len(generated) >= 1 and generated[-1] >= timestamp_begin
            penultimate_was_timestamp = len(generated) < 2 or generated[-2] >= timestamp_begin
            if last_was_timestamp:  # timestamps come in pairs (except right before end-of-text)
                if penultimate_was_timestamp:
                    logits[:, k, timestamp_begin:] = -inf  # a pair just closed: text (or end) next
                else:
                    logits[:, k, :eot] = -inf  # a segment just ended: its pair's timestamp next
            stamps = [token for token in generated if token >= timestamp_begin]
            if stamps:  # timestamps never decrease (a closing one may repeat its opening one)
                last = stamps[-1] if last_was_timestamp and not penultimate_was_timestamp else stamps[-1] + 1
                logits[:, k, timestamp_begin:last] = -inf
            if index == prompt_length:  # the first token is a timestamp, at most max_initial in
                logits[:, k, :timestamp_begin] = -inf
                if max_initial is not None:
                    logits[:, k, timestamp_begin + max_initial + 1 :] = -inf
        # a timestamp wherever the timestamps' total probability beats every text token
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        timestamp_logprob = logprobs[..., timestamp_begin:].logsumexp(dim=-1)
        text_logprob = logprobs[..., :timestamp_begin].max(dim=-1).values
        logits[..., :timestamp_begin].masked_fill_((timestamp_logprob > text_logprob).unsqueeze(-1), -inf)

    def process(logits: torch.Tensor, token_index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if begin.numel():
            first = (token_index == prompt_length).nonzero().flatten()
            if first.numel():
                logits[:, first.unsqueeze(-1), begin] = -inf
        if suppress.numel():
            logits[..., suppress] = -inf
        if timestamps:
            timestamp_rules(logits, token_index, tokens)
        return logits

    return process


def exact_argmax(bundle: WhisperBundle) -> ExactArgmax:
    """What `logits_processor` reads exactly: end-of-text, the special tokens and the timestamps
    (the rules mask the words below end-of-text as a whole, and compare the timestamps' total
    probability with the best token before them), and the best word left after suppression (the
    suppressed and begin-suppressed words leave the screen's threshold)."""
    config = bundle.settings
    eot = special_id(bundle, "<|endoftext|>")
    masked = set(config.suppress_tokens or []) | set(config.begin_suppress_tokens or [])
    return ExactArgmax(
        exact_from=eot,
        not_max=torch.tensor(sorted(i for i in masked if i < eot), dtype=torch.long, device=bundle.weights.device),
    )


def dual_streams(
    bundle: WhisperBundle,
    encoder_hidden_states: torch.Tensor,
    prompt_length: Union[int, Sequence[int]],
    *,
    adapted: Optional[AdaptedModel],
    drafting: bool,
    timestamps: bool = False,
    observe_index: Union[None, int, Sequence[Optional[int]]] = None,
    branches: bool = False,
) -> Union[WhisperStreams, HFDualStream]:
    """Both streams of the decoder over one window per row of `encoder_hidden_states` (the base
    model's alone without an adapter); `prompt_length`, `observe_index`: one, or one per row;
    `timestamps`: Whisper's timestamp rules on; `observe_index`: see `HFDualStream`.
    `WhisperStreams` (one row per window, static cache: the faster call) unless blank branches
    are asked for (`branches`) or the decoder holds layers it does not know: then `HFDualStream`
    (a single window)."""
    lora = adapted.factors if adapted is not None else None
    # the lean weights (with the adapter's factors), or peft's model over transformers' one
    whisper = adapted.peft_model.base_model.model if adapted is not None and lora is None else bundle.weights
    decoder = whisper.model.decoder
    lengths = [prompt_length] if isinstance(prompt_length, int) else list(prompt_length)
    # one processor per prompt length (the rules count positions from the prompt's end)
    made = {length: logits_processor(bundle, length, timestamps=timestamps) for length in set(lengths)}
    process = [made[length] for length in lengths]
    max_length = bundle.weights.config.max_target_positions
    if not (branches and drafting) and supported(decoder, lora):
        return WhisperStreams(
            decoder, whisper.proj_out, encoder_hidden_states, process_logits=process if len(process) > 1 else process[0],
            drafting=drafting, max_length=max_length, observe_index=observe_index, head_dtype=bundle.head_dtype,
            lora=lora, exact=exact_argmax(bundle),
        )
    if lora is not None:  # blank branches run through peft's model
        whisper = adapted.peft_model.base_model.model
        decoder = whisper.model.decoder
    if encoder_hidden_states.shape[0] != 1:
        raise NotImplementedError("batched decoding runs on WhisperStreams (no blank branches)")
    return HFDualStream(
        decoder,
        whisper.proj_out,
        encoder_hidden_states,
        process_logits=process[0],
        gate=adapted.gate if adapted is not None else None,
        drafting=drafting,
        max_length=max_length,
        placeholder_id=special_id(bundle, "<|endoftext|>"),
        observe_index=observe_index if not isinstance(observe_index, (list, tuple)) else observe_index[0],
        head_dtype=bundle.head_dtype,
    )


@dataclass
class WindowResult(DecodeResult):
    # P(<|nospeech|>) from the control stream's unprocessed logits at <|startoftranscript|>, as
    # Whisper's no-speech rule reads it
    no_speech_prob: float = 0.0


def decode_window(
    bundle: WhisperBundle,
    encoder_hidden_states: torch.Tensor,
    prompt: list[int],
    *,
    adapted: Optional[AdaptedModel],
    options: DecodeOptions,
    generator: Optional[torch.Generator] = None,
    timestamps: Optional[bool] = None,
) -> WindowResult:
    """Our decoding loop on one window: cross-regressive with an adapter (γ ≥ 1), else plain AR.

    timestamps: decode under Whisper's timestamp rules; None → whenever the prompt does not end
    in <|notimestamps|>."""
    return decode_windows(
        bundle, encoder_hidden_states, [prompt], adapted=adapted, options=options, generator=generator,
        timestamps=timestamps,
    )[0]


def decode_windows(
    bundle: WhisperBundle,
    encoder_hidden_states: torch.Tensor,
    prompts: Sequence[list[int]],
    *,
    adapted: Optional[AdaptedModel],
    options: DecodeOptions,
    generator: Optional[torch.Generator] = None,
    timestamps: Optional[bool] = None,
) -> list[WindowResult]:
    """`decode_window` over B windows at once (`encoder_hidden_states` [B, frames, d], one
    prompt each), decoded as one batch; every result equals its window's decoded alone
    (DESIGN §1.6). All prompts take timestamps, or none."""
    if encoder_hidden_states.shape[0] != len(prompts):
        raise ValueError(f"{encoder_hidden_states.shape[0]} windows for {len(prompts)} prompts")
    eot = special_id(bundle, "<|endoftext|>")
    no_timestamps = special_id(bundle, "<|notimestamps|>")
    if timestamps is None:
        kinds = {prompt[-1] != no_timestamps for prompt in prompts}
        if len(kinds) > 1:
            raise ValueError("a batch decodes every window with timestamps, or none")
        timestamps = kinds.pop()
    sot = special_id(bundle, "<|startoftranscript|>")
    observe = [prompt.index(sot) if sot in prompt else None for prompt in prompts]
    made: list = []

    def streams(drafting: bool):
        made.append(dual_streams(
            bundle, encoder_hidden_states, [len(prompt) for prompt in prompts], adapted=adapted, drafting=drafting,
            timestamps=timestamps, observe_index=observe if len(prompts) > 1 else observe[0],
            branches=options.blank_branches and len(prompts) == 1,
        ))
        return made[-1]

    results = decode_prompts(
        prompts,
        streams=streams,
        drafting_possible=adapted is not None,
        options=options,
        eos_token_id=eot,
        placeholder_id=eot,
        generator=generator,
        device=encoder_hidden_states.device,
    )
    model = made[0]
    observed = model.observed if isinstance(model, WhisperStreams) else [model.observed_logits]
    no_speech_id = bundle.settings.no_timestamps_token_id - 1
    return [
        WindowResult(**vars(result), no_speech_prob=0.0 if logits is None else float(logits.float().softmax(-1)[no_speech_id]))
        for result, logits in zip(results, observed)
    ]

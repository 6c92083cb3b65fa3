"""How a model family enters Algorithm 3: a `DistillationTask` (its teacher pass, its student's
block forward) that also evaluates a trained adapter and exports it. `WhisperTask` is the
encoder-decoder on audio, `LMTask` a decoder-only text LM; `as_task` picks one for a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, Union

import torch

from ..decoding import DecodeOptions, DecodeResult
from ..dual_stream import block_mask, cache_argument, project
from ..lm import LanguageModel
from ..lora import AdaptedModel, BaseWeights, new_adapter, save_adapter
from ..whisper import WhisperBundle, decode_window, logits_processor, special_id
from .data import Example


class DistillationTask(Protocol):
    """What Algorithm 3 needs from a model: its teacher pass and its student's block forward;
    and what a recipe does with the result: evaluate it, export it."""

    name: str  # the base model's name (messages)
    base: BaseWeights  # the loaded base model (adapters record its weights)
    weights_sha256: Optional[str]  # its weights' fingerprint: adapters record it
    vocab_size: int
    placeholder_id: int  # the token of empty draft slots (as at inference)

    def new_adapter(self, rank: int, seed: int) -> AdaptedModel:
        """A fresh (zero-delta) LoRA adapter on a private copy of the model."""

    def teacher_pass(self, example: Example) -> tuple[torch.Tensor, object]:
        """Control stream over the whole example: distributions [L, V] (row t = P(x_{t+1} | x_≤t))
        and its caches (the prefix keys/values the student reads)."""

    def student_logits(
        self, adapted: AdaptedModel, example: Example, cuts: torch.Tensor, drafts: torch.Tensor, cache
    ) -> torch.Tensor:
        """Predictive-stream logits [rows, γ+1, V] for blocks [x_cut, d_1..d_γ], as at inference."""

    def evaluate(
        self, adapted: AdaptedModel, examples: Sequence[Example], gamma: int, references: Optional[dict] = None
    ) -> dict:
        """Lossless greedy decode of every example: tokens per forward, mismatches vs the teacher, ..."""

    def export(self, adapted: AdaptedModel, directory: Path, card: dict) -> None:
        """The adapter in peft format with its record and a README card."""


def _teacher_pass(bundle: WhisperBundle, example: Example):
    """Base model over the whole transcript: processed teacher distributions and both caches."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    decoder = bundle.model.model.decoder
    hidden = example.encoder_states.to(bundle.model.dtype)
    tokens = example.tokens.unsqueeze(0)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.no_grad():
        out = decoder(input_ids=tokens, encoder_hidden_states=hidden, **cache_argument(decoder, cache), use_cache=True)
        logits = project(out.last_hidden_state, bundle.model.proj_out)
        index = torch.arange(tokens.shape[1])
        # timestamp rules where inference applies them: prompts not ending in <|notimestamps|>
        timestamps = int(example.tokens[example.prompt_length - 1]) != bundle.generation_config.no_timestamps_token_id
        process = logits_processor(bundle, example.prompt_length, timestamps=timestamps)
        logits = process(logits, index + 1, example.tokens)
        teacher = logits.softmax(-1)[0]  # [L, V]: row t = P(x_{t+1} | x_≤t)
    return teacher, cache


def student_logits(
    adapted: AdaptedModel, example: Example, cuts: torch.Tensor, drafts: torch.Tensor, teacher_cache
) -> torch.Tensor:
    """Whisper's predictive-stream logits [rows, γ+1, V] for blocks [x_cut, d_1..d_γ], exactly as
    `HFDualStream` computes its predictive row: the prefix keys/values are the control
    stream's (the teacher pass), the block runs with the adapter on."""
    from transformers.cache_utils import EncoderDecoderCache

    rows, gamma = drafts.shape
    L = example.tokens.shape[0]
    block = torch.cat([example.tokens[cuts].view(-1, 1), drafts], dim=1)
    whisper = adapted.peft_model.base_model.model
    # a block near the end of a full window reaches past the decoder's last position: those slots
    # are placeholders without targets (as inference never drafts there), so any position will do
    last = whisper.config.max_target_positions - 1
    positions = (cuts.view(-1, 1) + torch.arange(gamma + 1).view(1, -1)).clamp_max(last)
    adapted.gate.gate = None  # adapter on in every row: all rows are predictive
    cache = EncoderDecoderCache(
        _repeat_cache(teacher_cache.self_attention_cache, rows), _repeat_cache(teacher_cache.cross_attention_cache, rows)
    )
    hidden = whisper.model.decoder(
        input_ids=block,
        encoder_hidden_states=example.encoder_states.to(whisper.dtype).expand(rows, -1, -1),
        **cache_argument(whisper.model.decoder, cache),
        position_ids=positions,
        attention_mask=block_mask(cuts, L, gamma + 1, whisper.dtype),
        use_cache=True,
    ).last_hidden_state
    return project(hidden, whisper.proj_out)


def _repeat_cache(cache, rows: int):
    """A DynamicCache's keys/values repeated (as views) for `rows` student rows."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache([(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)) for layer in cache.layers])


def _lossless_figures(
    examples: Sequence[Example],
    gamma: int,
    decode: Callable[[Example], DecodeResult],
    text: Optional[Callable[[list[int]], str]] = None,
    references: Optional[dict[str, str]] = None,
) -> dict:
    """Decode every example: tokens per forward, mismatches vs the teacher's tokens and, given
    `text` and human transcripts per utterance id, the WER of the decoded text."""
    from ..metrics import word_error_rate

    tokens = calls = mismatches = 0
    hypotheses = {}
    for ex in examples:
        result = decode(ex)
        if text is not None:
            hypotheses[ex.utterance] = text(result.tokens)
        tokens += len(result.tokens)
        calls += result.forward_calls
        mismatches += result.tokens != ex.tokens[ex.prompt_length :].tolist()
    figures = {"gamma": gamma, "tokens_per_forward": tokens / calls, "mismatches": mismatches, "utterances": len(examples)}
    if references and hypotheses:
        scored = [u for u in hypotheses if u in references]
        figures["wer"] = word_error_rate([references[u] for u in scored], [hypotheses[u] for u in scored])
    return figures


def _export(adapted: AdaptedModel, directory: Path, base: BaseWeights, card: dict, heading: str, recipe: str) -> None:
    """Save the adapter in peft format with its record (crosswhisper_adapter.json) and a card."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_adapter(adapted, directory, base, **card)
    lines = [heading, ""]
    lines += [f"Made by `{recipe}`; every figure below comes from that run.", ""]
    lines += ["```json", json.dumps(card, indent=2), "```", ""]
    (directory / "README.md").write_text("\n".join(lines))


class WhisperTask:
    """Algorithm 3 on a Whisper decoder (the audio enters through the cached encoder states)."""

    recipe = "recipes/train_whisper_adapter.py"

    def __init__(self, bundle: WhisperBundle):
        self.bundle = self.base = bundle
        self.name, self.weights_sha256 = bundle.name, bundle.weights_sha256
        self.vocab_size = bundle.model.config.vocab_size
        self.placeholder_id = special_id(bundle, "<|endoftext|>")

    def new_adapter(self, rank: int, seed: int) -> AdaptedModel:
        return new_adapter(self.bundle, rank=rank, seed=seed)

    def teacher_pass(self, example: Example):
        return _teacher_pass(self.bundle, example)

    def student_logits(self, adapted, example, cuts, drafts, cache) -> torch.Tensor:
        return student_logits(adapted, example, cuts, drafts, cache)

    def evaluate(self, adapted, examples, gamma, references: Optional[dict[str, str]] = None) -> dict:
        """Lossless greedy decode of every example: tokens per forward, mismatches vs the teacher
        and, given human transcripts per utterance id, the WER of the decoded text."""
        bundle = self.bundle
        eot = special_id(bundle, "<|endoftext|>")

        def decode(ex: Example) -> DecodeResult:
            hidden = ex.encoder_states.to(bundle.model.dtype)
            prompt = ex.tokens[: ex.prompt_length].tolist()
            # long-form windows (timestamp mode) were decoded up to the decoder's whole context
            long_form = prompt[-1] != bundle.generation_config.no_timestamps_token_id
            limit = bundle.model.config.max_target_positions if long_form else DecodeOptions.max_new_tokens
            options = DecodeOptions(gamma=gamma, max_new_tokens=limit)
            return decode_window(bundle, hidden, prompt, adapted=adapted, options=options)

        def text(tokens: list[int]) -> str:
            return bundle.tokenizer.decode([t for t in tokens if t < eot]).strip()

        return _lossless_figures(examples, gamma, decode, text, references)

    def export(self, adapted: AdaptedModel, directory: Path, card: dict) -> None:
        heading = f"# Predictive-stream adapter for Whisper {card.get('base_model', self.name)}"
        _export(adapted, directory, self.bundle, card, heading, self.recipe)


class LMTask:
    """Algorithm 3 on a decoder-only text LM (`lm.LanguageModel`)."""

    recipe = "recipes/train_lm_adapter.py"

    def __init__(self, lm: LanguageModel):
        self.lm = self.base = lm
        self.name, self.weights_sha256 = lm.name, lm.weights_sha256
        self.vocab_size = lm.model.config.vocab_size
        self.placeholder_id = lm.placeholder_id

    def new_adapter(self, rank: int, seed: int) -> AdaptedModel:
        return new_adapter(self.lm, rank=rank, seed=seed)

    def teacher_pass(self, example: Example):
        from transformers.cache_utils import DynamicCache

        model = self.lm.model
        with torch.no_grad():
            hidden = model.get_decoder()(
                input_ids=example.tokens.unsqueeze(0).to(model.device),
                **cache_argument(model.get_decoder(), DynamicCache(config=model.config)),
                use_cache=True,
            )
            teacher = project(hidden.last_hidden_state, model.get_output_embeddings()).softmax(-1)[0]
        return teacher, hidden.past_key_values

    def student_logits(self, adapted, example, cuts, drafts, cache) -> torch.Tensor:
        rows, gamma = drafts.shape
        block = torch.cat([example.tokens[cuts].view(-1, 1), drafts], dim=1)
        causal_lm = adapted.peft_model.base_model.model
        adapted.gate.gate = None  # adapter on in every row: all rows are predictive
        hidden = causal_lm.get_decoder()(
            input_ids=block,
            **cache_argument(causal_lm.get_decoder(), _repeat_cache(cache, rows)),
            position_ids=cuts.view(-1, 1) + torch.arange(gamma + 1).view(1, -1),
            attention_mask=block_mask(cuts, example.tokens.shape[0], gamma + 1, causal_lm.dtype),
            use_cache=True,
        ).last_hidden_state
        return project(hidden, causal_lm.get_output_embeddings())

    def evaluate(self, adapted, examples, gamma, references: Optional[dict[str, str]] = None) -> dict:
        """Lossless greedy decode of every example: tokens per forward and mismatches vs the
        teacher (`references` is unused: there are no human answers)."""
        from ..lm import decode_tokens

        def decode(ex: Example) -> DecodeResult:
            # the same budget as the teacher's continuation (which may have stopped at the limit)
            options = DecodeOptions(gamma=gamma, max_new_tokens=ex.tokens.shape[0] - ex.prompt_length)
            return decode_tokens(self.lm, ex.tokens[: ex.prompt_length].tolist(), adapted=adapted, options=options)

        return _lossless_figures(examples, gamma, decode)

    def export(self, adapted: AdaptedModel, directory: Path, card: dict) -> None:
        heading = f"# Predictive-stream adapter for {card.get('base_model', self.name)}"
        _export(adapted, directory, self.lm, card, heading, self.recipe)


def as_task(model: Union[WhisperBundle, LanguageModel, DistillationTask]) -> DistillationTask:
    """The task of a loaded model (a task is returned as is)."""
    if isinstance(model, WhisperBundle):
        return WhisperTask(model)
    if isinstance(model, LanguageModel):
        return LMTask(model)
    return model

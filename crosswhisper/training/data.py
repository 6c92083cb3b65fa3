"""What training reads: examples (the base model's own outputs, cached on disk) and the drafts
of its blocks (the replay buffer, or the student's own drafts from the block before)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from ..audio import load_audio
from ..decoding import DecodeOptions
from ..lm import LanguageModel
from ..whisper import WhisperBundle, decode_window, decoder_prompt, encode

logger = logging.getLogger(__name__)


@dataclass
class Example:
    utterance: str  # utterance (or prompt) id
    encoder_states: Optional[torch.Tensor]  # [1, frames, d_model], float16 to halve memory; None for text
    tokens: torch.Tensor  # [L] prompt + the base model's own greedy output (+ end token)
    prompt_length: int


def prepare_examples(
    bundle: WhisperBundle, audio_paths: Sequence[Path], *, cache_file: Optional[Path] = None
) -> list[Example]:
    """Encoder outputs and the base model's greedy transcripts (our exact γ=0 loop) per file."""
    if cache_file is not None and cache_file.exists():
        stored = torch.load(cache_file, weights_only=False)
        if stored.get("paths") == [str(p) for p in audio_paths] and stored.get("model") == bundle.weights_sha256:
            return stored["examples"]
        logger.info("%s is for other audio or weights; recomputing", cache_file)
    examples = []
    prompt = decoder_prompt(bundle, "en")
    for path in tqdm(audio_paths, desc="teacher transcripts", unit="utt"):
        hidden = encode(bundle, load_audio(path)[: 30 * 16000])
        result = decode_window(bundle, hidden, prompt, adapted=None, options=DecodeOptions(gamma=0))
        examples.append(
            Example(
                utterance=Path(path).stem,
                encoder_states=hidden.to(torch.float16),
                tokens=torch.tensor(prompt + result.tokens),
                prompt_length=len(prompt),
            )
        )
    if cache_file is not None:
        _store(cache_file, {"paths": [str(p) for p in audio_paths], "model": bundle.weights_sha256, "examples": examples})
    return examples


def prepare_long_form_examples(
    bundle: WhisperBundle, audio_files: Sequence[Path], *, cache_file: Optional[Path] = None
) -> list[Example]:
    """The windows Whisper's sequential long-form loop decodes (DESIGN §1.5), one example each:
    the loop (greedy, no temperature fallback) runs over every file with our exact γ=0 decoder,
    and every window decode it makes is recorded as it ran — encoder states, prompt
    (<|startofprev|> + previous text + <|startoftranscript|>, timestamp mode) and tokens."""
    from ..whisper.longform import LongFormOptions, transcribe_long_form
    from ..whisper.transcribe import DraftingDecoder

    key = {"paths": [str(p) for p in audio_files], "model": bundle.weights_sha256, "kind": "long-form"}
    if cache_file is not None and cache_file.exists():
        stored = torch.load(cache_file, weights_only=False)
        if stored.get("key") == key:
            return stored["examples"]
        logger.info("%s is for other audio or weights; recomputing", cache_file)
    decoder = DraftingDecoder(bundle, None, DecodeOptions(gamma=0, token_logprobs=True, max_new_tokens=448), None)
    examples = []
    for path in tqdm(audio_files, desc="teacher long-form windows", unit="file"):
        windows = []

        def recorder(hidden, prompt, temperature):
            result = decoder(hidden, prompt, temperature)
            windows.append((hidden, list(prompt), list(result.tokens)))
            return result

        transcribe_long_form(load_audio(path), bundle, LongFormOptions(temperature=(0.0,)), decode=recorder)
        for i, (hidden, prompt, tokens) in enumerate(windows):
            examples.append(
                Example(
                    utterance=f"{Path(path).stem}@{i}",
                    encoder_states=hidden.to(torch.float16),
                    tokens=torch.tensor(prompt + tokens),
                    prompt_length=len(prompt),
                )
            )
    if cache_file is not None:
        _store(cache_file, {"key": key, "examples": examples})
    return examples


def prepare_lm_examples(
    lm: LanguageModel,
    prompts: dict,
    *,
    max_new_tokens: int,
    batch_size: int = 1,
    cache_file: Optional[Path] = None,
) -> list[Example]:
    """The base LM's own greedy continuation of every prompt (id → text or chat messages).

    batch_size 1 uses our exact γ=0 loop (the held-out sets: lossless decoding must reproduce
    them token for token); larger batches use transformers `generate` with left padding, several
    times faster on a CPU, whose padded rows may differ from single-row greedy by float
    rounding in rare near-ties: harmless for training targets.
    """
    from ..lm import decode_tokens, encode_prompt

    key = {"prompts": prompts, "model": lm.weights_sha256, "max_new_tokens": max_new_tokens, "batch": batch_size}
    if cache_file is not None and cache_file.exists():
        stored = torch.load(cache_file, weights_only=False)
        if stored.get("key") == key:
            return stored["examples"]
        logger.info("%s is for other prompts or weights; recomputing", cache_file)
    encoded = [(name, encode_prompt(lm, prompt)) for name, prompt in prompts.items()]
    continuations = {}
    progress = tqdm(total=len(encoded), desc="teacher continuations", unit="prompt")
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        if batch_size == 1:
            name, ids = batch[0]
            continuations[name] = decode_tokens(
                lm, ids, adapted=None, options=DecodeOptions(gamma=0, max_new_tokens=max_new_tokens)
            ).tokens
        else:
            continuations.update(_generate_batch(lm, batch, max_new_tokens))
        progress.update(len(batch))
    progress.close()
    examples = [
        Example(utterance=name, encoder_states=None, tokens=torch.tensor(ids + continuations[name]), prompt_length=len(ids))
        for name, ids in encoded
        if continuations[name]
    ]
    if cache_file is not None:
        _store(cache_file, {"key": key, "examples": examples})
    return examples


def _store(cache_file: Path, content: dict) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".partial")
    torch.save(content, tmp)
    tmp.replace(cache_file)


def _generate_batch(lm: LanguageModel, batch: list[tuple[str, list[int]]], max_new_tokens: int) -> dict:
    """Greedy continuations of several prompts in one `generate` call (left padding)."""
    pad = lm.eos_token_ids[0]
    width = max(len(ids) for _, ids in batch)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in batch])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in batch])
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=list(lm.eos_token_ids), pad_token_id=pad, top_k=None, top_p=None, temperature=None,
        )
    continuations = {}
    for (name, _), row in zip(batch, out[:, width:].tolist()):
        stop = next((i for i, token in enumerate(row) if token in lm.eos_token_ids), None)
        continuations[name] = row if stop is None else row[: stop + 1]
    return continuations


class ReplayBuffer:
    """Per utterance, the student's latest argmax prediction for every position (its drafts),
    and its second choice there (a plausible wrong draft, see `rejected_draft_prob`)."""

    def __init__(
        self,
        examples: Sequence[Example],
        gamma: int,
        vocab: int,
        placeholder: int,
        generator,
        truth: float = 0.5,
        *,
        alternatives: bool = False,
    ):
        self.vocab = vocab
        self.predictions = {}
        # second choices, kept only for runs that need wrong drafts: their random start draws
        # from the generator, and runs without them must reproduce as before
        self.alternatives = {}
        for ex in examples:
            # start from the truth corrupted at 1 - truth: early drafts are poor, as at inference
            noisy = ex.tokens.clone()
            flip = torch.rand(noisy.shape, generator=generator) < 1.0 - truth
            noisy[flip] = torch.randint(vocab, (int(flip.sum()),), generator=generator)
            self.predictions[ex.utterance] = torch.cat([noisy, torch.full((gamma + 1,), placeholder)])
            if alternatives:  # random until the student's second choices replace them
                self.alternatives[ex.utterance] = torch.randint(vocab, (noisy.shape[0] + gamma + 1,), generator=generator)

    def drafts(self, ex: Example, cuts: torch.Tensor, gamma: int) -> torch.Tensor:
        index = cuts.view(-1, 1) + torch.arange(1, gamma + 1).view(1, -1)
        return self.predictions[ex.utterance][index]

    def update(self, ex: Example, cuts: torch.Tensor, argmax: torch.Tensor, second: Optional[torch.Tensor] = None) -> None:
        index = cuts.view(-1, 1) + torch.arange(1, argmax.shape[1] + 1).view(1, -1)
        self.predictions[ex.utterance][index] = argmax
        if second is not None and ex.utterance in self.alternatives:
            self.alternatives[ex.utterance][index] = second

    def wrong_draft(self, ex: Example, positions: torch.Tensor) -> torch.Tensor:
        """A draft for each position that is not the true token: the student's latest first
        choice if it is wrong, else its second choice."""
        truth = ex.tokens[positions]
        first = self.predictions[ex.utterance][positions]
        second = self.alternatives[ex.utterance][positions]
        second = torch.where(second == truth, (truth + 1) % self.vocab, second)  # only a random start can tie
        return torch.where(first != truth, first, second)


def _previous_block_drafts(
    task, adapted, example, cuts, replay, gamma, low, cache, rejected_prob=0.0, generator=None, depth=1
) -> torch.Tensor:
    """Drafts for blocks at `cuts` as inference makes them after rejecting the first draft of a
    block at cut − 1: that block's predictions at slots 1..γ (positions cut+1..cut+γ). With
    `rejected_prob`, that block's draft for position cut is a wrong one (it was rejected). That
    block's own drafts come from the replay buffer (depth 1) or, recursively, from the block
    before it (depth > 1). Rows at the first possible cut get placeholders, as the first call
    of a decode does."""
    previous = (cuts - 1).clamp_min(low)
    if depth > 1:
        previous_drafts = _previous_block_drafts(
            task, adapted, example, previous, replay, gamma, low, cache, rejected_prob, generator, depth - 1
        )
    else:
        previous_drafts = replay.drafts(example, previous, gamma)
    if rejected_prob:
        rejected = torch.rand(cuts.shape, generator=generator) < rejected_prob
        wrong = replay.wrong_draft(example, previous + 1)
        previous_drafts[:, 0] = torch.where(rejected, wrong, previous_drafts[:, 0])
    with torch.no_grad():
        logits = task.student_logits(adapted, example, previous, previous_drafts, cache)
    top2 = logits[:, 1:].topk(2, dim=-1).indices
    drafts, second = top2[..., 0], top2[..., 1]
    first = cuts == low
    drafts[first] = task.placeholder_id
    replay.update(example, cuts[~first], drafts[~first], second[~first])
    return drafts

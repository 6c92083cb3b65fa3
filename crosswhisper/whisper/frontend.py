"""Around the model, without transformers: log-mel features, the vocabulary, the generation settings.

Decoding a clip needs transformers' `WhisperFeatureExtractor`, `WhisperTokenizerFast` and
`GenerationConfig` only for a few numbers, ids and strings, but importing and loading them took
~1 s of a 3 s command-line run (issue #18). These classes give the same (tested against them),
read from the same files; the transformers objects stay the reference and are made on first
use (`WhisperBundle.feature_extractor`, `.tokenizer`, `.generation_config`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

# transformers' `mel_filter_bank` (slaney scale and norm, 0–8 kHz) for the front ends of the
# released models, float64 as it makes them; written by recipes/make_mel_filters.py
MEL_FILTERS = Path(__file__).resolve().parent / "assets" / "mel_filters.npz"


def mel_filters_key(feature_size: int, n_fft: int, sampling_rate: int) -> str:
    return f"mel{feature_size}_fft{n_fft}_sr{sampling_rate}"


class LogMel:
    """Whisper's log-mel features of ≤ 30 s windows, as `WhisperFeatureExtractor` computes them
    with torch (its path whenever torch is installed), bit for bit: each window zero-padded (or
    cut) to 30 s, a centred STFT, power, mel filters, log10, clamped at 8 below the window's
    maximum, scaled. `StreamedFeatures` (longform.py) computes the same of longer audio."""

    def __init__(self, *, mel_filters: np.ndarray, n_fft: int = 400, hop_length: int = 160,
                 n_samples: int = 480_000, sampling_rate: int = 16_000):
        self.mel_filters = mel_filters  # [1 + n_fft // 2, n_mels], float64
        self.feature_size = mel_filters.shape[1]
        self.n_fft, self.hop_length, self.n_samples, self.sampling_rate = n_fft, hop_length, n_samples, sampling_rate
        self._filters_t = torch.from_numpy(mel_filters).to(torch.float32).T  # [n_mels, bins]
        self._window = torch.hann_window(n_fft)

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path]) -> Optional["LogMel"]:
        """From a model directory's preprocessor_config.json; None when its front end is not
        one of the shipped filter banks or it dithers (then use transformers' extractor)."""
        config = json.loads((Path(directory) / "preprocessor_config.json").read_text(encoding="utf-8"))
        if config.get("dither", 0.0) or config.get("padding_value", 0.0) or config.get("feature_extractor_type") != "WhisperFeatureExtractor":
            return None
        size, n_fft, rate = config.get("feature_size", 80), config.get("n_fft", 400), config.get("sampling_rate", 16_000)
        if not MEL_FILTERS.is_file():  # a broken install: fall back rather than fail the model's cache entry
            return None
        with np.load(MEL_FILTERS) as banks:
            key = mel_filters_key(size, n_fft, rate)
            if key not in banks:
                return None
            filters = banks[key]
        return cls(mel_filters=filters, n_fft=n_fft, hop_length=config.get("hop_length", 160),
                   n_samples=config.get("chunk_length", 30) * rate, sampling_rate=rate)

    @classmethod
    def of(cls, extractor: Any) -> Optional["LogMel"]:
        """From transformers' `WhisperFeatureExtractor` (None if it dithers)."""
        if getattr(extractor, "dither", 0.0) or getattr(extractor, "padding_value", 0.0):
            return None
        return cls(mel_filters=extractor.mel_filters, n_fft=extractor.n_fft, hop_length=extractor.hop_length,
                   n_samples=extractor.n_samples, sampling_rate=extractor.sampling_rate)

    def __call__(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        """16 kHz mono windows → features [B, n_mels, n_samples / hop_length] (float32)."""
        batch = np.zeros((len(windows), self.n_samples), dtype=np.float32)
        for row, window in enumerate(windows):
            window = np.asarray(window, dtype=np.float32)[: self.n_samples]
            batch[row, : len(window)] = window
        waveform = torch.from_numpy(batch)
        stft = torch.stft(waveform, self.n_fft, self.hop_length, window=self._window, return_complex=True)
        log_spec = self.log10_power(stft[..., :-1])  # the last frame is dropped, as the extractor does
        return self.scaled(log_spec, log_spec.max(dim=2, keepdim=True)[0].max(dim=1, keepdim=True)[0])

    def log10_power(self, stft: torch.Tensor) -> torch.Tensor:
        """STFT frames [..., bins, frames] → log10 of their mel power, floored at 1e-10."""
        return torch.clamp(self._filters_t @ (stft.abs() ** 2).contiguous(), min=1e-10).log10()

    @staticmethod
    def scaled(log_spec: torch.Tensor, maximum: torch.Tensor) -> torch.Tensor:
        """Whisper's dynamic range: clamped at 8 below `maximum` (the audio's), then scaled."""
        return (torch.maximum(log_spec, maximum - 8.0) + 4.0) / 4.0


class Vocabulary:
    """The model's tokenizer (a `tokenizers.Tokenizer`, tokenizer.json) for what decoding asks
    of it: text ↔ ids without special tokens, and special tokens by name."""

    def __init__(self, backend: Any):
        self.backend = backend  # tokenizers.Tokenizer

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path]) -> "Vocabulary":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(Path(directory) / "tokenizer.json")))

    @classmethod
    def of(cls, tokenizer: Any) -> "Vocabulary":
        """From transformers' `WhisperTokenizerFast`."""
        return cls(tokenizer.backend_tokenizer)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text tokens → text (special tokens are the callers' to drop)."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self.backend.id_to_token(token_id)


@dataclass(frozen=True)
class GenerationSettings:
    """The values of a Whisper generation config (generation_config.json) that decoding reads,
    under the config's names; defaults as transformers' `GenerationConfig` has them."""

    eos_token_id: int  # <|endoftext|>
    decoder_start_token_id: int  # <|startoftranscript|>
    no_timestamps_token_id: int  # <|notimestamps|>; <|nospeech|> is the id before, timestamps the ids after
    prev_sot_token_id: Optional[int] = None  # <|startofprev|>
    suppress_tokens: tuple[int, ...] = ()  # never generated
    begin_suppress_tokens: tuple[int, ...] = ()  # not generated first
    max_initial_timestamp_index: Optional[int] = None  # the first timestamp at most this many steps in
    is_multilingual: bool = False
    lang_to_id: dict[str, int] = field(default_factory=dict)  # "<|en|>" → id
    task_to_id: dict[str, int] = field(default_factory=dict)  # "transcribe" → id
    alignment_heads: Optional[list[list[int]]] = None  # [layer, head] pairs for word timestamps

    @classmethod
    def from_dict(cls, values: dict) -> "GenerationSettings":
        names = {item.name for item in fields(cls)}
        given = {key: value for key, value in values.items() if key in names and value is not None}
        for key in ("suppress_tokens", "begin_suppress_tokens"):
            if key in given:
                given[key] = tuple(given[key])
        return cls(**given)

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path]) -> "GenerationSettings":
        return cls.from_dict(json.loads((Path(directory) / "generation_config.json").read_text(encoding="utf-8")))

"""Audio input: any file soundfile or librosa can read, or an array → 16 kHz mono float32.

Log-mel features come from transformers' `WhisperFeatureExtractor` (see `whisper.py`), so this
module only has to deliver the waveform Whisper expects.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Union

import numpy as np

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # Whisper's fixed input rate
CHUNK_SECONDS = 30  # one encoder window
CHUNK_SAMPLES = SAMPLE_RATE * CHUNK_SECONDS

AudioInput = Union[str, os.PathLike, np.ndarray]


class AudioError(ValueError):
    """The input cannot be used as audio (not decodable, or empty). The message names the file."""


def load_audio(audio: AudioInput, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Return `audio` as a 1-D float32 array at `sample_rate` Hz, mono.

    A NumPy array is taken to be already at `sample_rate` (as openai-whisper does); a path is
    decoded with soundfile (wav, flac, ogg/opus, ...) and, failing that, librosa/audioread
    (mp3 and anything ffmpeg knows).

    Raises FileNotFoundError for a missing file and AudioError for a file that is not audio or
    holds no samples.
    """
    if isinstance(audio, np.ndarray):
        return _as_mono_float32(audio, source="array")
    if not isinstance(audio, (str, os.PathLike)):
        raise TypeError(f"audio must be a path or a NumPy array, not {type(audio).__name__}")
    path = Path(audio)
    if not path.exists():
        raise FileNotFoundError(f"audio file not found: {path}")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")

    waveform, rate = _decode(path)
    waveform = _as_mono_float32(waveform, source=str(path))
    if rate != sample_rate:
        import librosa  # imported lazily: it is slow to import and rarely needed

        waveform = librosa.resample(waveform, orig_sr=rate, target_sr=sample_rate).astype(np.float32)
    return waveform


def _decode(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        # always_2d + transpose later keeps mono/stereo handling in one place
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        return data.T, rate
    except (sf.LibsndfileError, RuntimeError) as sf_error:
        sf_message = str(sf_error)
    try:
        import warnings

        import librosa

        with warnings.catch_warnings():
            # librosa warns before falling back to audioread; the failure below says enough
            warnings.simplefilter("ignore")
            data, rate = librosa.load(str(path), sr=None, mono=False)
        return np.asarray(data, dtype=np.float32), int(rate)
    except Exception as librosa_error:  # audioread raises a zoo of exception types
        raise AudioError(
            f"{path}: not a readable audio file (soundfile: {sf_message}; "
            f"librosa: {type(librosa_error).__name__}: {librosa_error})"
        ) from None


def _as_mono_float32(data: np.ndarray, *, source: str) -> np.ndarray:
    data = np.asarray(data)
    if data.dtype.kind not in "fiu":
        raise AudioError(f"{source}: audio samples must be numeric, got dtype {data.dtype}")
    if data.size == 0:
        raise AudioError(f"{source}: the audio is empty (0 samples)")
    if data.ndim == 2:
        # (channels, samples) from our decoders; average the channels
        data = data.mean(axis=0) if data.shape[0] <= data.shape[1] else data.mean(axis=1)
    elif data.ndim != 1:
        raise AudioError(f"{source}: expected 1-D (or channels × samples) audio, got shape {data.shape}")
    if data.dtype.kind in "iu":
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max)
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise AudioError(f"{source}: the audio contains NaN or infinite samples")
    return data

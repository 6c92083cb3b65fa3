"""Audio input: any audio or video file FFmpeg can read (through PyAV), or an array → 16 kHz mono float32.

Files are decoded with PyAV (`av`), whose wheels carry FFmpeg: wav, flac, mp3, ogg/opus, AAC
m4a, webm, and the audio track of video containers such as mp4 or mkv all open without a system
ffmpeg. The first audio stream is taken; it is downmixed (channels averaged) and resampled with
FFmpeg's resampler unless it already is 16 kHz mono, in which case the decoded samples are
converted directly (a 16-bit sample s becomes s / 32768, as soundfile does), so that a 16 kHz
mono FLAC or WAV gives exactly the waveform soundfile would.

Log-mel features come from transformers' `WhisperFeatureExtractor` (see the `whisper` package), so this
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
    decoded with PyAV/FFmpeg (wav, flac, mp3, ogg/opus, m4a, webm, the audio track of an mp4 or
    mkv, ...): the first audio stream, downmixed to mono and resampled to `sample_rate`.

    Raises FileNotFoundError for a missing file and AudioError for a file that is not audio, has
    no audio track or holds no samples. A file cut short decodes as far as it is readable.
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

    return _as_mono_float32(_decode(path, sample_rate), source=str(path))


def _decode(path: Path, sample_rate: int) -> np.ndarray:
    """The first audio stream of `path` as 1-D float32 at `sample_rate` Hz, mono."""
    import av  # imported lazily: `import crosswhisper` and array input do not need it

    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.error.FFmpegError as error:
        raise AudioError(f"{path}: not a readable audio file ({_describe(error)})") from None
    with container:
        if not container.streams.audio:
            kinds = sorted({stream.type for stream in container.streams}) or ["no streams"]
            raise AudioError(f"{path}: has no audio track (found: {', '.join(kinds)})")
        stream = container.streams.audio[0]
        to_mono = _ToMono(sample_rate)
        pieces: list[np.ndarray] = []
        try:
            # demux() ends with an empty packet per stream, whose decode() flushes the decoder
            for packet in container.demux(stream):
                for frame in packet.decode():
                    pieces.extend(to_mono.push(frame))
            pieces.extend(to_mono.flush())
        except av.error.FFmpegError as error:
            # a truncated or damaged file: keep what decoded cleanly, if anything did
            if not any(len(piece) for piece in pieces):
                raise AudioError(f"{path}: not a readable audio file ({_describe(error)})") from None
            logger.warning("%s: decoding stopped early (%s); using the audio before it", path, _describe(error))
    if not pieces:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(pieces)


class _ToMono:
    """Decoded frames → float32 mono chunks at `rate`; FFmpeg's resampler only when needed."""

    def __init__(self, rate: int):
        self.rate = rate
        self._resampler = None
        self._source: tuple | None = None  # (format, layout, rate) the resampler was set up for

    def push(self, frame) -> list[np.ndarray]:
        if self._resampler is None and frame.sample_rate == self.rate and len(frame.layout.channels) == 1:
            # already what Whisper wants: convert the samples ourselves, bit-exact with soundfile
            return [_frame_samples(frame)]
        import av

        out: list[np.ndarray] = []
        source = (frame.format.name, frame.layout.name, frame.sample_rate)
        if self._resampler is not None and source != self._source:
            out = self.flush()  # the stream changed its parameters: start a new resampler
        if self._resampler is None:
            # The channel layout is kept and the channels are averaged below: FFmpeg's own
            # stereo → mono downmix is (L + R) / √2, 3 dB louder than the source and able to clip
            # (its rematrix_maxval option fixes that, but only recent PyAV passes options through).
            self._resampler = av.AudioResampler(format="fltp", rate=self.rate)
            self._source = source
        frame.pts = None  # timestamps are irrelevant here; gaps in them must not upset the resampler
        out.extend(_downmix(f) for f in self._resampler.resample(frame))
        return out

    def flush(self) -> list[np.ndarray]:
        if self._resampler is None:
            return []
        out = [_downmix(f) for f in self._resampler.resample(None)]
        self._resampler = None
        return out


def _downmix(frame) -> np.ndarray:
    """A resampled (planar float32) frame → 1-D float32, the mean of its channels."""
    data = frame.to_ndarray()  # (channels, samples)
    return data[0] if data.shape[0] == 1 else data.mean(axis=0, dtype=np.float32)


# integer formats → (offset, scale) with float = (int - offset) * scale, soundfile's normalisation
_INT_SCALE = {
    "u8": (128, 2.0**-7),
    "s16": (0, 2.0**-15),
    "s32": (0, 2.0**-31),
    "s64": (0, 2.0**-63),
}


def _frame_samples(frame) -> np.ndarray:
    """One mono frame's samples as 1-D float32 (integer PCM scaled to [-1, 1))."""
    data = frame.to_ndarray().reshape(-1)  # (1, n) for packed and planar alike
    name = frame.format.name.removesuffix("p")
    if name in ("flt", "dbl"):
        return data.astype(np.float32, copy=False)
    offset, scale = _INT_SCALE[name]
    if offset:
        data = data.astype(np.int16) - offset
    # one rounding (int → float32), then an exact power-of-two scaling
    return data.astype(np.float32) * np.float32(scale)


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {getattr(error, 'strerror', None) or error}"


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

"""crosswhisper: Whisper decoding made faster by Cross-Regression.

    >>> import crosswhisper
    >>> result = crosswhisper.transcribe("speech.wav")   # bundled tiny.en, offline
    >>> result.text, result.stats.tokens_per_forward
"""

from .audio import AudioError, load_audio
from .results import DecodingStats, Segment, Transcription
from .whisper import TranscribeOptions, WhisperBundle, load_whisper, transcribe
from .writers import get_writer

__all__ = [
    "AudioError",
    "DecodingStats",
    "Segment",
    "TranscribeOptions",
    "Transcription",
    "WhisperBundle",
    "get_writer",
    "load_audio",
    "load_whisper",
    "transcribe",
]
__version__ = "0.1.0"

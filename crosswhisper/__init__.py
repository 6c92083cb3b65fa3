"""crosswhisper: Whisper decoding made faster by Cross-Regression.

    >>> import crosswhisper
    >>> result = crosswhisper.transcribe("speech.wav")   # bundled tiny.en, offline
    >>> result.text, result.stats.tokens_per_forward
"""

from .audio import AudioError, load_audio
from .models import WhisperBundle, load_whisper
from .whisper import DecodingStats, Segment, Transcription, transcribe

__all__ = [
    "AudioError",
    "DecodingStats",
    "Segment",
    "Transcription",
    "WhisperBundle",
    "load_audio",
    "load_whisper",
    "transcribe",
]
__version__ = "0.1.0"

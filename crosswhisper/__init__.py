"""crosswhisper: Whisper decoding made faster by Cross-Regression.

    >>> import crosswhisper
    >>> result = crosswhisper.transcribe("speech.wav")   # bundled tiny.en, offline
    >>> result.text, result.stats.tokens_per_forward
"""

from importlib import import_module

# Names are imported on first use (PEP 562): `import crosswhisper.audio` in a reading task or a
# writer does not pay for torch and transformers (≈ 4 s here).
_EXPORTS = {
    "AudioError": ".audio",
    "load_audio": ".audio",
    "DecodingStats": ".results",
    "Segment": ".results",
    "Transcription": ".results",
    "TranscribeOptions": ".whisper",
    "WhisperBundle": ".whisper",
    "load_whisper": ".whisper",
    "transcribe": ".whisper",
    "transcribe_batch": ".whisper",
    "get_writer": ".writers",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # once
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])

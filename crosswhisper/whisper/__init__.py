"""Whisper: loading (bundled, CTranslate2, transformers, hub), one window's decoding, `transcribe()`.

    loading.py     a model name → `WhisperBundle` (bundled, CTranslate2 dir, HF dir or hub id)
    model.py       the weights and the encoder in plain torch (decoding imports no transformers)
    frontend.py    log-mel features, vocabulary, generation settings without transformers
    ct2.py         CTranslate2 `model.bin` reading and the exact conversion to transformers
    cache.py       the on-disk cache of converted models
    decode.py      one 30 s window: features, prompt, language, logits processing, decoding
    transcribe.py  `TranscribeOptions`, `transcribe()` in steps
    batched.py     `transcribe_batch()`: voice-activity chunks, B windows per call
"""

from .batched import transcribe_batch
from .decode import (
    decode_window,
    decode_windows,
    decoder_prompt,
    detect_language,
    dual_streams,
    encode,
    generate_greedy,
    is_multilingual,
    logits_processor,
    special_id,
    validate_language,
)
from .loading import BUNDLED_MODELS, LORA, ModelNotAvailableError, WhisperBundle, bundled_model_dir, load_whisper
from .transcribe import DEFAULT_GAMMA, TranscribeOptions, get_bundle, transcribe

__all__ = [
    "BUNDLED_MODELS", "DEFAULT_GAMMA", "LORA", "ModelNotAvailableError", "TranscribeOptions", "WhisperBundle",
    "bundled_model_dir", "decode_window", "decode_windows", "decoder_prompt", "detect_language", "dual_streams", "encode",
    "generate_greedy", "get_bundle", "is_multilingual", "load_whisper", "logits_processor", "special_id",
    "transcribe", "transcribe_batch", "validate_language",
]

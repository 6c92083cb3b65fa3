"""Write crosswhisper/whisper/assets/mel_filters.npz: transformers' Whisper mel filter banks.

`whisper.frontend.LogMel` computes the log-mel features without importing transformers (~1 s
of a command-line run); its filters must be the very numbers `WhisperFeatureExtractor` makes,
so they are made by transformers' own `mel_filter_bank` (float64) for the front ends of the
released Whisper models (80 mel bins; 128 for large-v3 and turbo) and checked against the
extractor in tests/test_lean.py (equal in float32, what the features use;
the float64 last bits depend on the CPU that makes them).

    python recipes/make_mel_filters.py
"""

import numpy as np
from transformers import WhisperFeatureExtractor

from crosswhisper.whisper.frontend import MEL_FILTERS, mel_filters_key

FRONT_ENDS = [(80, 400, 16_000), (128, 400, 16_000)]  # (mel bins, n_fft, sampling rate)


def main() -> None:
    banks = {}
    for size, n_fft, rate in FRONT_ENDS:
        extractor = WhisperFeatureExtractor(feature_size=size, n_fft=n_fft, sampling_rate=rate)
        banks[mel_filters_key(size, n_fft, rate)] = extractor.mel_filters
    MEL_FILTERS.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(MEL_FILTERS, **banks)
    print(f"wrote {MEL_FILTERS} ({', '.join(banks)})")


if __name__ == "__main__":
    main()

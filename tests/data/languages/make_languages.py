"""Recreate the language-detection clips de.flac, es.flac, it.flac with espeak-ng.

Each sentence is synthesised by `espeak-ng -v <lang> -w <tmp>.wav "<sentence>"` (espeak-ng's
default voice for the language, 22 050 Hz), resampled to 16 kHz mono and written as 16-bit FLAC.

    python tests/data/languages/make_languages.py
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
HERE = Path(__file__).resolve().parent
SENTENCES = {
    "de": "Guten Morgen. Heute ist das Wetter schön, und wir gehen am Nachmittag im Park spazieren.",
    "es": "Buenos días a todos. Hoy hace buen tiempo y vamos a pasear por el parque esta tarde.",
    "it": "Buongiorno a tutti. Oggi fa bel tempo e nel pomeriggio andiamo a fare una passeggiata nel parco.",
}
# Not French: espeak-ng's French is recognised badly by Whisper base (tests/data/README.md).


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for lang, sentence in SENTENCES.items():
            wav = Path(tmp) / f"{lang}.wav"
            subprocess.run(["espeak-ng", "-v", lang, "-w", str(wav), sentence], check=True)
            audio, rate = sf.read(wav, dtype="float32", always_2d=True)
            audio = librosa.resample(audio.mean(axis=1), orig_sr=rate, target_sr=SAMPLE_RATE)
            sf.write(HERE / f"{lang}.flac", np.clip(audio, -1, 1), SAMPLE_RATE, subtype="PCM_16")
            print(f"{lang}: {len(audio) / SAMPLE_RATE:.2f} s  {sentence}")


if __name__ == "__main__":
    main()

"""Recreate the long-form test clip 1088-134318.flac and its reference 1088-134318.txt.

Joins the first utterances of LibriSpeech train-clean-5 chapter 1088/134318 (speaker 1088, held
out from the shipped adapters' training as a development speaker), in utterance order, with
0.5 s of silence between them, until the next utterance would pass --max-seconds; writes a
16 kHz mono 16-bit FLAC and the utterances' transcripts joined by spaces on one line.

    python tests/data/longform/make_longform.py --data ../shared/data/LibriSpeech/train-clean-5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
SPEAKER, CHAPTER = "1088", "134318"
GAP_SECONDS = 0.5
HERE = Path(__file__).resolve().parent
# ../shared beside the repository
DEFAULT_DATA = HERE.parents[3] / "shared" / "data" / "LibriSpeech" / "train-clean-5"


def read_16k_mono(path: Path) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32", always_2d=True)  # libsndfile reads Ogg Opus
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        import librosa

        audio = librosa.resample(audio, orig_sr=rate, target_sr=SAMPLE_RATE)
    return audio.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LibriSpeech train-clean-5 folder")
    parser.add_argument("--max-seconds", type=float, default=105.0)
    parser.add_argument("--output", type=Path, default=HERE)
    args = parser.parse_args()

    chapter = args.data / SPEAKER / CHAPTER
    lines = (chapter / f"{SPEAKER}-{CHAPTER}.trans.txt").read_text().splitlines()
    gap = np.zeros(int(GAP_SECONDS * SAMPLE_RATE), dtype=np.float32)
    pieces: list[np.ndarray] = []
    texts: list[str] = []
    length = 0
    for line in sorted(lines):
        utt, _, text = line.partition(" ")
        audio = read_16k_mono(next(chapter.glob(f"{utt}.*")))
        extra = len(audio) + (len(gap) if pieces else 0)
        if pieces and (length + extra) / SAMPLE_RATE > args.max_seconds:
            break
        if pieces:
            pieces.append(gap)
        pieces.append(audio)
        texts.append(text)
        length += extra
    joined = np.concatenate(pieces)
    stem = f"{SPEAKER}-{CHAPTER}"
    args.output.mkdir(parents=True, exist_ok=True)
    sf.write(args.output / f"{stem}.flac", joined, SAMPLE_RATE, subtype="PCM_16")
    (args.output / f"{stem}.txt").write_text(" ".join(texts) + "\n")
    print(f"{stem}: {len(texts)} utterances, {len(joined) / SAMPLE_RATE:.2f} s")


if __name__ == "__main__":
    main()

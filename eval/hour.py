"""One long file through the CLI (issue #17): train-clean-5 chapters joined in order (0.5 s pauses)
into a single FLAC of about an hour, transcribed by `crosswhisper-transcribe` as a user runs it,
with its progress bar; the resident memory of that process is sampled every half second.

Reported: audio length, wall time and RTFx of the whole process (start-up and loading included),
peak resident memory and the resident memory at each tenth of the run (bounded memory: it must
not grow with the audio decoded), WER against the joined LibriSpeech transcripts.

    python eval/hour.py --model tiny.en --data ../shared/data/LibriSpeech/train-clean-5 --minutes 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from common import DEFAULT_DATA, EvalError, find_librispeech, machine_info

from crosswhisper.audio import SAMPLE_RATE, load_audio
from crosswhisper.metrics import word_error_rate

GAP_SECONDS = 0.5


def joined_file(data: Path, minutes: float, path: Path) -> str:
    """Write chapters joined in order (every speaker) up to `minutes` to `path`; → the reference."""
    gap = np.zeros(int(GAP_SECONDS * SAMPLE_RATE), dtype=np.float32)
    pieces, texts, total = [], [], 0
    for _, audio_path, text in find_librispeech(data):  # sorted by speaker, chapter, utterance
        audio = load_audio(audio_path)
        pieces += [audio, gap]
        texts.append(text)
        total += len(audio) + len(gap)
        if total >= minutes * 60 * SAMPLE_RATE:
            break
    sf.write(path, np.concatenate(pieces[:-1]), SAMPLE_RATE, subtype="PCM_16")
    return " ".join(texts)


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA.parent / "train-clean-5")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--output", type=Path, default=Path("results/hour.json"))
    parser.add_argument("cli_args", nargs="*", help="more crosswhisper-transcribe options (after --)")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        raise EvalError(f"{args.data}: not found (pass --data, a LibriSpeech subset)")
    with tempfile.TemporaryDirectory() as work:
        audio_path = Path(work) / "joined.flac"
        reference = joined_file(args.data, args.minutes, audio_path)
        seconds = sf.info(audio_path).duration
        print(f"{audio_path.name}: {seconds / 60:.1f} min", flush=True)
        command = [sys.executable, "-m", "crosswhisper.cli", str(audio_path), "--model", args.model,
                   "--output-dir", work, "--output-format", "txt", *args.cli_args]
        samples: list[tuple[float, int]] = []
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)  # the progress bar: stderr, shown

        def sample():
            while process.poll() is None:
                try:
                    samples.append((time.perf_counter() - started, resident_bytes(process.pid)))
                except (FileNotFoundError, ProcessLookupError):
                    break
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if process.wait() != 0:
            raise EvalError(f"crosswhisper-transcribe failed ({process.returncode})")
        wall = time.perf_counter() - started
        sampler.join()
        text = (Path(work) / "joined.txt").read_text()
    wer = word_error_rate([reference], [text])
    tenths = [max((rss for t, rss in samples if t <= wall * k / 10), default=0) for k in range(1, 11)]
    peak = max(rss for _, rss in samples)
    print(f"\n{seconds / 60:.1f} min of audio in {wall:.0f} s (RTFx {seconds / wall:.1f}), WER {100 * wer:.2f} %, "
          f"peak resident memory {peak / 2**20:.0f} MiB")
    print("resident memory (MiB) at each tenth of the run: " + " ".join(f"{b / 2**20:.0f}" for b in tenths))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "model": args.model, "audio_seconds": seconds, "wall_seconds": wall, "rtfx": seconds / wall, "wer": wer,
        "peak_rss_bytes": peak, "rss_by_tenth_bytes": tenths, "cli_args": args.cli_args, "machine": machine_info("cpu"),
        "pid_samples": len(samples), "cpu_count": os.cpu_count(),
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Whole-process time and peak memory of one short transcription from the command line (issue #18).

What a user waits for when they transcribe one clip: interpreter start, imports, model and
adapter load, decoding, writing the file, exit. Each system runs as a fresh process, the
systems interleaved round by round (this machine is shared: compare within a round); the
figures are the medians over rounds of wall seconds and of peak resident memory (the child's
own ru_maxrss, from wait4).

    python eval/startup.py [--audio CLIP] [--model tiny.en] [--rounds 5] [--output eval/startup-cpu.json]

Systems: `crosswhisper-transcribe` at float32 and int8 (its defaults otherwise: the shipped
adapter, lossless drafting, timestamps, a .txt file), and faster-whisper's `WhisperModel` on
the same CTranslate2 weights at int8 and float32 (greedy, as a Python one-liner: it has no
command line), writing the text.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_AUDIO = REPO / "tests/data/LibriSpeech/test-clean/1089/134686/1089-134686-0000.flac"  # 10.4 s

FASTER_WHISPER = """
import sys
from faster_whisper import WhisperModel
model = WhisperModel(sys.argv[1], device="cpu", compute_type=sys.argv[2], cpu_threads=int(sys.argv[3]))
segments, _ = model.transcribe(sys.argv[4], beam_size=1, temperature=0)
open(sys.argv[5], "w").write(" ".join(segment.text.strip() for segment in segments))
"""


def run(command: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak resident MiB, exit status) of one child process."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    errors = child.stderr.read().decode(errors="replace")
    if child.returncode:
        raise RuntimeError(f"{command[:3]} failed ({child.returncode}): {errors[-1500:]}")
    return wall, usage.ru_maxrss / 1024, child.returncode


def systems(audio: Path, model: str, output: Path, threads: int) -> dict[str, list[str]]:
    script = shutil.which("crosswhisper-transcribe")  # the installed command, as a user runs it
    launcher = [script] if script else [sys.executable, "-m", "crosswhisper.cli"]
    cli = [*launcher, str(audio), "--model", model, "--output-dir", str(output), "--output-format", "txt"]
    found = {
        "crosswhisper-transcribe float32": cli,
        "crosswhisper-transcribe --compute-type int8": cli + ["--compute-type", "int8"],
    }
    try:
        import faster_whisper  # noqa: F401  (only to know whether it is installed)

        from crosswhisper.whisper.loading import bundled_model_dir

        ct2 = str(bundled_model_dir(model))
        for compute_type in ("int8", "float32"):
            found[f"faster-whisper {compute_type}"] = [
                sys.executable, "-c", FASTER_WHISPER, ct2, compute_type, str(threads), str(audio), str(output / "fw.txt"),
            ]
    except ImportError:
        print("faster-whisper is not installed: its rows are left out", file=sys.stderr)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio", type=Path, default=DEFAULT_AUDIO)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="faster-whisper's cpu_threads (torch uses every core)")
    parser.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        commands = systems(args.audio.resolve(), args.model, Path(scratch), args.threads)
        for command in commands.values():  # warm-up: the OS file cache, a first conversion
            run(command)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, command in commands.items():
                wall, rss, _ = run(command)
                samples[name].append((wall, rss))

    rows = {
        name: {"seconds": statistics.median(w for w, _ in values), "peak_mib": statistics.median(r for _, r in values),
               "seconds_each": [round(w, 3) for w, _ in values]}
        for name, values in samples.items()
    }
    print(f"{args.audio.name} ({args.model}), {args.rounds} rounds, medians")
    print("| system | whole process s | peak resident MiB |\n|---|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['seconds']:.2f} | {row['peak_mib']:.0f} |")
    if args.output:
        report = {"audio": str(args.audio), "model": args.model, "rounds": args.rounds, "machine": platform.processor() or platform.machine(),
                  "cpus": os.cpu_count(), "python": platform.python_version(), "systems": rows}
        args.output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

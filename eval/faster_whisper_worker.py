"""faster-whisper (CTranslate2) in a child process, for eval/librispeech.py's faster-whisper systems.

CTranslate2's OpenMP threads in the same process as torch's slowed the torch systems measured
after it (tiny.en, 2-core CPU: lossless decode 1.41 s alone, 2.26 s with faster-whisper loaded
beside it), so each faster-whisper system runs in a child process of its own, driven utterance
by utterance (still interleaved with the other systems); its threads wait passively between
calls (OMP_WAIT_POLICY=PASSIVE). `Worker` is the parent's side; the child is this file run as

    python eval/faster_whisper_worker.py CT2_DIR COMPUTE_TYPE DEVICE THREADS [BATCH_SIZE]

which reads pickled float32 audio arrays on stdin and writes pickled (tokens per segment, segment
texts, seconds) on stdout until stdin closes; the transcribe call alone is timed. With BATCH_SIZE
the child runs `BatchedInferencePipeline` (eval/batched.py), and an input may come as
(audio, options) to set that call's options. It imports neither torch nor crosswhisper.
"""

from __future__ import annotations

import atexit
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

# greedy, options matching the reference decode (transformers' generate without timestamps)
FASTER_WHISPER_OPTIONS = dict(
    beam_size=1,
    without_timestamps=True,
    vad_filter=False,
    condition_on_previous_text=False,
    temperature=0,
)


class WorkerDied(Exception):
    """The child process ended (its exit status is in the message)."""


class Worker:
    """A faster-whisper model on a CTranslate2 directory, in a child process."""

    def __init__(self, ct2_dir: Path, compute_type: str, device: str, threads: int, batch_size: Optional[int] = None):
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        batched = [str(batch_size)] if batch_size else []
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(ct2_dir), compute_type, device, str(threads), *batched],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        atexit.register(self.process.kill)

    def transcribe(self, audio: np.ndarray, **options) -> tuple[list[list[int]], list[str], float]:
        """(token ids per segment, segment texts, seconds of the transcribe call) for one input;
        `options`: the transcribe call's (default: `FASTER_WHISPER_OPTIONS`)."""
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        pickle.dump((audio, options) if options else audio, self.process.stdin)
        self.process.stdin.flush()
        try:
            return pickle.load(self.process.stdout)
        except EOFError:
            raise WorkerDied(f"exit {self.process.wait()}") from None


def serve(ct2_dir: str, compute_type: str, device: str, threads: int, batch_size: Optional[int] = None) -> int:
    """The child's loop: a pickled audio array (or (audio, options)) in on stdin → pickled
    results out on stdout."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    out = os.fdopen(os.dup(1), "wb")  # the results channel; anything printed goes to stderr
    os.dup2(2, 1)
    model = WhisperModel(ct2_dir, device=device, compute_type=compute_type, cpu_threads=threads)
    transcribe = model.transcribe
    if batch_size:
        pipeline = BatchedInferencePipeline(model)

        def transcribe(audio, **options):
            return pipeline.transcribe(audio, batch_size=batch_size, **options)
    while True:
        try:
            message = pickle.load(sys.stdin.buffer)
        except EOFError:
            return 0
        audio, options = message if isinstance(message, tuple) else (message, FASTER_WHISPER_OPTIONS)
        t0 = time.perf_counter()
        segments = list(transcribe(audio, **options)[0])  # the generator does the work
        seconds = time.perf_counter() - t0
        pickle.dump(([list(s.tokens) for s in segments], [s.text for s in segments], seconds), out)
        out.flush()


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6):
        sys.exit(f"usage: {sys.argv[0]} CT2_DIR COMPUTE_TYPE DEVICE THREADS [BATCH_SIZE] (started by eval/librispeech.py, longform.py, batched.py)")
    sys.exit(serve(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) == 6 else None))

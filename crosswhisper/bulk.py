"""Many files: what to transcribe (files, folders, manifests), where each transcript goes, what is
already done, and `transcribe_files`, which runs the rest on Ray Data.

    >>> from crosswhisper.bulk import transcribe_files
    >>> report = transcribe_files(["archive/"], output_dir="out", output_format="srt")   # local Ray
    >>> report.written, report.skipped, report.failed

The pipeline (Ray Data, `pip install "crosswhisper[ray]"`): the input list → reading and
resampling as CPU tasks (`load_audio`) → an actor pool of transcribers (one model each, sized to
the cluster's GPUs, else to its CPUs) that write every file's outputs as soon as it is done
(atomically: `writers`). Resumable: a file whose outputs all exist is skipped, so a rerun after a
kill does only the rest. A file that fails (unreadable, undecodable) is recorded with its error in
`<output_dir>/failures.jsonl` and never stops the others; a rerun leaves the recorded ones alone
unless asked to retry them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from .writers import OUTPUT_FORMATS

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# what a folder is searched for (recursively); a file named explicitly is tried whatever its suffix
AUDIO_SUFFIXES = frozenset(
    ".wav .flac .mp3 .m4a .ogg .opus .oga .aac .wma .aiff .aif .webm .mp4 .mkv .mov .avi .m4v".split()
)
FAILURES_FILE = "failures.jsonl"


@dataclass(frozen=True)
class Job:
    """One input file and where its transcripts go."""

    audio: Path  # the audio or video file
    subdir: Path = Path()  # folder under output_dir: the file's place below an input folder ("" for a named file)

    def outputs(self, output_dir: PathLike, output_format: str) -> list[Path]:
        """The files the writers produce for it (`<output_dir>/<subdir>/<stem>.<ext>`)."""
        formats = OUTPUT_FORMATS if output_format == "all" else (output_format,)
        return [Path(output_dir) / self.subdir / f"{self.audio.stem}.{ext}" for ext in formats]


def collect_jobs(inputs: Sequence[PathLike] = (), *, manifest: Optional[PathLike] = None) -> list[Job]:
    """Files as given, folders searched recursively for audio/video (their structure is kept under
    the output folder), and a manifest's lines (one path per line, relative to the manifest's
    folder; blank lines and # comments skipped). Raises ValueError for an unreadable manifest or for
    two inputs whose transcripts would overwrite each other."""
    jobs: list[Job] = []
    paths = [Path(p) for p in inputs]
    if manifest is not None:
        manifest = Path(manifest)
        try:
            lines = manifest.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ValueError(f"cannot read manifest {manifest}: {error.strerror or error}") from None
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                path = Path(line).expanduser()
                paths.append(path if path.is_absolute() else manifest.parent / path)
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                logger.warning("no audio or video files under %s", path)
            jobs += [Job(p, p.parent.relative_to(path)) for p in found]
        else:  # a missing file fails when it is read, as an unreadable one: the others still run
            jobs.append(Job(path))
    seen: dict[Path, Path] = {}
    for job in jobs:
        target = job.subdir / job.audio.stem
        if target in seen and seen[target].resolve() != job.audio.resolve():
            raise ValueError(
                f"{seen[target]} and {job.audio} would write the same transcripts ({target}.*): "
                "rename one of them"
            )
        seen[target] = job.audio
    # the same file named twice is transcribed once
    unique = {(job.audio.resolve(), job.subdir): job for job in jobs}
    return list(unique.values())


def is_done(job: Job, output_dir: PathLike, output_format: str) -> bool:
    return all(path.exists() for path in job.outputs(output_dir, output_format))


@dataclass
class BulkReport:
    """What a `transcribe_files` run did."""

    written: list[Path] = field(default_factory=list)  # input files transcribed in this run
    skipped: int = 0  # input files whose outputs already existed
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (input file, error) of this run
    failed_before: int = 0  # input files left alone because an earlier run recorded them as failed
    failures_file: Optional[Path] = None  # the failures manifest, when it lists any file


class FailureLog:
    """`<output_dir>/failures.jsonl`: one JSON object per failed file ({"file": absolute path,
    "error"}). It keeps the earlier runs' failures of files not retried, adds this run's, and is
    rewritten atomically after each failure (a kill loses none); without failures it is removed."""

    def __init__(self, output_dir: PathLike):
        self.path = Path(output_dir) / FAILURES_FILE
        self.earlier: dict[str, str] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.earlier[entry["file"]] = entry["error"]
                except (ValueError, KeyError, TypeError):
                    logger.warning("%s: skipped a line that is not a failure record: %r", self.path, line[:80])
        self.entries: list[tuple[Path, str]] = []
        self._changed = False  # a rerun that changes nothing leaves the file as it was

    def retry(self, audio: Path) -> None:
        """This run tries the file again: its earlier failure is forgotten (a new one is added)."""
        if self.earlier.pop(str(audio.resolve()), None) is not None:
            self._changed = True

    def add(self, audio: Path, error: str) -> None:
        self.entries.append((audio, error))
        self._write()

    def finish(self) -> Optional[Path]:
        if self.entries or self.earlier:
            if self._changed:
                self._write()
            return self.path
        self.path.unlink(missing_ok=True)
        return None

    def _write(self) -> None:
        self._changed = False
        records = {**self.earlier, **{str(path.resolve()): error for path, error in self.entries}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "w", encoding="utf-8") as file:
            for path, error in records.items():
                file.write(json.dumps({"file": path, "error": error}, ensure_ascii=False) + "\n")
        partial.replace(self.path)


class _Transcriber:
    """A Ray Data actor: one model in memory, transcribes the rows it is given and writes their
    outputs; returns one status row per file (errors become rows, not exceptions). A model or
    adapter that cannot load marks every row `fatal`: the driver stops the run (Ray would
    otherwise restart the actor again and again)."""

    def __init__(self, model, adapter, options, device, threads, output_dir, output_format):
        import torch

        from .cli import configure_output
        from .lora import resolve_adapter
        from .whisper.transcribe import get_bundle
        from .writers import get_writer

        configure_output(verbose=False)  # the workers' library warnings stay out of the driver's log
        if device == "cpu" and threads:
            torch.set_num_threads(threads)
        self.options, self.device, self.fatal = options, device, ""
        self.output_dir, self.write = Path(output_dir), lambda subdir: get_writer(output_format, self.output_dir / subdir)
        try:
            self.bundle = get_bundle(model, device=device)
        except Exception as error:  # whatever the loader raises, no file can be done
            self.fatal = f"cannot load model {model!r}: {error}"
            return
        try:
            # "auto" with none shipped for the model stays "auto": no drafting (as the plain CLI)
            self.adapter = adapter if adapter is None else resolve_adapter(self.bundle, adapter) or adapter
        except (OSError, ValueError) as error:
            self.fatal = f"cannot use adapter {adapter!r}: {error}"

    def __call__(self, batch: dict) -> dict:
        from .whisper.transcribe import transcribe

        errors = [self.fatal or error for error in batch["error"]]
        for i, (audio, subdir, waveform) in enumerate(zip(batch["audio"], batch["subdir"], batch["waveform"])):
            if errors[i]:
                continue  # not readable (or no model): reported by the driver
            try:
                result = transcribe(waveform, model=self.bundle, adapter=self.adapter, device=self.device, options=self.options)
                self.write(subdir)(result, audio)
            except (OSError, ValueError) as error:
                errors[i] = f"{type(error).__name__}: {error}"
        return {"audio": batch["audio"], "error": errors, "fatal": [bool(self.fatal)] * len(errors)}


def _read(row: dict) -> dict:
    """A Ray task: decode and resample one file (16 kHz mono float32), or record why not."""
    import numpy as np

    from .audio import load_audio

    try:
        waveform, error = load_audio(row["audio"]), ""
    except (OSError, ValueError) as exc:
        waveform, error = np.zeros(0, dtype=np.float32), f"{type(exc).__name__}: {exc}"
    return {**row, "waveform": waveform, "error": error}


def _quiet_ray(verbose: bool) -> None:
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = verbose  # our bar counts files
    if not verbose:
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _pool_size(workers: Optional[int], threads: Optional[int], device: Optional[str]) -> tuple[str, int, int]:
    """(device, actors, threads per actor): one actor per GPU when the cluster has GPUs (and no
    device was forced), else one per `threads` CPUs (default min(4, CPUs of the cluster)); a
    2-core machine gets one actor of 2 threads."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if device is None:
        device = "cuda" if gpus else "cpu"
    if device.startswith("cuda"):
        if not gpus:
            raise ValueError("device cuda asked for, but the Ray cluster has no GPUs")
        return device, workers or gpus, threads or 0
    threads = threads or min(4, cpus)
    return device, workers or max(1, cpus // threads), threads


def transcribe_files(
    inputs: Sequence[PathLike] = (),
    *,
    manifest: Optional[PathLike] = None,
    output_dir: PathLike = ".",
    output_format: str = "txt",
    model: str = "tiny.en",
    adapter: Optional[str] = "auto",
    options=None,
    address: Optional[str] = None,
    workers: Optional[int] = None,
    threads: Optional[int] = None,
    device: Optional[str] = None,
    retry_failed: bool = False,
    progress: bool = True,
    verbose: bool = False,
) -> BulkReport:
    """Transcribe files and folders on a Ray cluster and write their transcripts under output_dir.

    inputs / manifest: as `collect_jobs`. address: a Ray cluster ("auto", "ray://host:10001", ...);
    None joins the one in $RAY_ADDRESS or starts a local one. workers / threads: actors and torch
    threads per actor (default `_pool_size`). device: "cpu", "cuda" (default: cuda when the
    cluster has GPUs). retry_failed: also try the files that failures.jsonl lists (skipped
    otherwise, so that a rerun does nothing once every file is done or recorded as failed).
    options: `TranscribeOptions`. Model and adapter as `transcribe()`; a
    model or adapter that cannot load raises (it would fail every file)."""
    if output_format != "all" and output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}; choose from {', '.join(OUTPUT_FORMATS)}, all")
    jobs = collect_jobs(inputs, manifest=manifest)
    failures = FailureLog(output_dir)
    todo = [job for job in jobs if not is_done(job, output_dir, output_format)]
    report = BulkReport(skipped=len(jobs) - len(todo))
    for job in set(jobs) - set(todo):
        failures.retry(job.audio)  # done since (e.g. by the plain CLI): no longer a failure
    if not retry_failed:
        todo = [job for job in todo if str(job.audio.resolve()) not in failures.earlier]
    report.failed_before = len(jobs) - report.skipped - len(todo)
    for job in todo:
        failures.retry(job.audio)
    logger.info("%d file(s): %d already transcribed, %d failed before (skipped), %d to do",
                len(jobs), report.skipped, report.failed_before, len(todo))
    if not todo:
        report.failures_file = failures.finish()
        return report

    from tqdm import tqdm

    from .whisper.transcribe import TranscribeOptions

    try:
        import ray
    except ImportError:
        raise ImportError('the Ray pipeline needs ray: pip install "crosswhisper[ray]"') from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.ERROR)
    try:
        _quiet_ray(verbose)
        device, actors, per_actor = _pool_size(workers, threads, device)
        logger.info("%d file(s) on %d actor(s), device %s", len(todo), actors, device)
        # absolute paths: Ray's workers do not run in this process's working directory
        rows = [{"audio": str(job.audio.absolute()), "subdir": str(job.subdir)} for job in todo]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        # reading is light beside the model: it takes no CPU slot from the transcribers, and a
        # few reading workers keep them fed (every extra worker is a process to start)
        dataset = dataset.map(_read, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=max(2, actors)))
        dataset = dataset.map_batches(
            _Transcriber,
            fn_constructor_kwargs=dict(
                model=model, adapter=adapter, options=options or TranscribeOptions(), device=device,
                threads=per_actor, output_dir=str(Path(output_dir).resolve()), output_format=output_format,
            ),
            batch_size=1,  # outputs are written file by file: a kill loses at most the files in flight
            compute=ray.data.ActorPoolStrategy(size=actors),
            **({"num_gpus": 1} if device.startswith("cuda") else {"num_cpus": per_actor}),
        )
        with tqdm(total=len(todo), desc="transcribing", unit="file", disable=not progress) as bar:
            for row in dataset.iter_rows():
                audio = Path(row["audio"])
                if row["fatal"]:
                    raise RuntimeError(row["error"])
                if row["error"]:
                    failures.add(audio, row["error"])
                    tqdm.write(f"error: {audio}: {row['error']}")
                else:
                    report.written.append(audio)
                bar.update(1)
    finally:
        report.failed = failures.entries
        report.failures_file = failures.finish()
        if started_here:
            ray.shutdown()
    return report

"""Writers of transcripts: txt, srt, vtt, json, usable from Python as from the CLI.

    >>> from crosswhisper.writers import get_writer
    >>> get_writer("srt", "out/")(result, "talk.wav")      # writes out/talk.srt

As openai-whisper's `get_writer`: one class per format; `"all"` writes every format. Files are
written under a temporary name and renamed, so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, TextIO, Union

from .results import Transcription

PathLike = Union[str, os.PathLike]


def format_timestamp(seconds: float, decimal_marker: str = ".") -> str:
    """HH:MM:SS.mmm (vtt) or HH:MM:SS,mmm (srt)."""
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{millis:03d}"


class ResultWriter:
    """Writes one `Transcription` to `<output_dir>/<audio stem>.<extension>`."""

    extension: str

    def __init__(self, output_dir: PathLike):
        self.output_dir = Path(output_dir)

    def __call__(self, result: Transcription, audio_path: PathLike) -> Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        target = self.output_dir / f"{Path(audio_path).stem}.{self.extension}"
        partial = target.with_name(target.name + ".partial")
        with open(partial, "w", encoding="utf-8") as file:
            self.write_result(result, file)
        partial.replace(target)
        return target

    def write_result(self, result: Transcription, file: TextIO) -> None:
        raise NotImplementedError


class WriteTXT(ResultWriter):
    extension = "txt"

    def write_result(self, result: Transcription, file: TextIO) -> None:
        file.write(result.text + "\n")


class WriteSRT(ResultWriter):
    extension = "srt"

    def write_result(self, result: Transcription, file: TextIO) -> None:
        for index, segment in enumerate(result.segments, start=1):
            start, end = format_timestamp(segment.start, ","), format_timestamp(segment.end, ",")
            file.write(f"{index}\n{start} --> {end}\n{segment.text}\n\n")


class WriteVTT(ResultWriter):
    extension = "vtt"

    def write_result(self, result: Transcription, file: TextIO) -> None:
        file.write("WEBVTT\n\n")
        for segment in result.segments:
            file.write(f"{format_timestamp(segment.start)} --> {format_timestamp(segment.end)}\n{segment.text}\n\n")


class WriteJSON(ResultWriter):
    extension = "json"

    def write_result(self, result: Transcription, file: TextIO) -> None:
        json.dump(dataclasses.asdict(result), file, ensure_ascii=False, indent=2)
        file.write("\n")


WRITERS: dict[str, type[ResultWriter]] = {w.extension: w for w in (WriteTXT, WriteSRT, WriteVTT, WriteJSON)}
OUTPUT_FORMATS = tuple(WRITERS)


def get_writer(output_format: str, output_dir: PathLike) -> Callable[[Transcription, PathLike], Union[Path, list[Path]]]:
    """A writer for one format ("txt", "srt", "vtt", "json") or for all of them ("all")."""
    if output_format == "all":
        writers = [writer(output_dir) for writer in WRITERS.values()]
        return lambda result, audio_path: [write(result, audio_path) for write in writers]
    if output_format not in WRITERS:
        raise ValueError(f"unknown output format {output_format!r}; choose from {', '.join(OUTPUT_FORMATS)}, all")
    return WRITERS[output_format](output_dir)

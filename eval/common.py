"""What every evaluation script shares: LibriSpeech data, the device clock, machine and versions.

The scripts in eval/ are run as `python eval/<script>.py`, so this module (beside them) imports as
`common`; crosswhisper itself is the installed package (`pip install -e ".[eval]"`).

Data: a local LibriSpeech tree (`find_librispeech`, `load_local`) or a Hugging Face dataset in
LibriSpeech's schema (`load_hf`), decoded to 16 kHz float32 up front (`Utterance`). The default
tree, `DEFAULT_DATA`, is test-clean in ../shared beside the repository (the published figures);
the repository carries 7 of its utterances in tests/data/LibriSpeech/test-clean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

import crosswhisper
from crosswhisper.audio import SAMPLE_RATE, load_audio

logger = logging.getLogger("crosswhisper.eval")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "LibriSpeech" / "test-clean"
REPO_TEST_CLEAN = REPO / "tests" / "data" / "LibriSpeech" / "test-clean"  # 7 utterances, in the repository
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# LibriSpeech utterance ids: SPEAKER-CHAPTER-INDEX
_UTTERANCE_ID = re.compile(r"^(\d+)-(\d+)-(\d+)$")
_HF_TEXT_COLUMNS = ("text", "sentence", "transcript", "transcription", "normalized_text")


class EvalError(Exception):
    """A problem the user must fix (missing data, unreachable dataset, bad option): one line."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Utterance:
    """One utterance, its audio decoded to 16 kHz mono float32 before any timing starts."""

    id: str
    speaker: Optional[str]
    audio: np.ndarray = dataclasses.field(repr=False)
    reference: Optional[str]  # None: no transcript line → timed but not scored
    source: str  # the audio file (or dataset row) it came from

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def _utterance_sort_key(utterance_id: str):
    match = _UTTERANCE_ID.match(utterance_id)
    return (0, tuple(int(g) for g in match.groups()), "") if match else (1, (), utterance_id)


def find_librispeech(directory: Path) -> list[tuple[str, Path, Optional[str]]]:
    """(utterance id, audio path, transcript or None) for a LibriSpeech tree, sorted by id.

    The canonical layout is SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt beside
    SPEAKER-CHAPTER-NNNN.<ext>; the audio may be in any format crosswhisper.load_audio reads (flac,
    opus, wav, ...). `directory` may be one subset (test-clean) or a folder holding several.
    Audio without a transcript line is kept (reference None); a transcript line without audio
    is reported and skipped.
    """
    directory = Path(directory)
    if not directory.is_dir():
        hint = "pass --data DIR (a LibriSpeech subset) or --hf-dataset NAME"
        if directory == DEFAULT_DATA:  # ../shared is not beside this checkout
            hint += f"; the repository holds 7 test-clean utterances: --data {REPO_TEST_CLEAN}"
        raise EvalError(f"LibriSpeech directory not found: {directory} ({hint})")
    transcripts: dict[str, str] = {}
    for trans in sorted(directory.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            utt, _, text = line.strip().partition(" ")
            if utt:
                transcripts[utt] = text.strip()
    audio: dict[str, Path] = {}
    for path in sorted(directory.rglob("*")):
        if path.suffix.lower() == ".txt" or not path.is_file():
            continue
        stem = path.name.split(".", 1)[0]
        if not _UTTERANCE_ID.match(stem):
            continue
        if stem in audio:
            logger.warning("%s: several audio files (%s, %s); using the first", stem, audio[stem].name, path.name)
            continue
        audio[stem] = path
    missing = sorted(set(transcripts) - set(audio), key=_utterance_sort_key)
    if missing:
        logger.warning("%d transcript lines have no audio file and are skipped (e.g. %s)", len(missing), missing[0])
    unscored = [u for u in audio if u not in transcripts]
    if unscored:
        logger.warning("%d audio files have no transcript line: timed but not scored", len(unscored))
    if not audio:
        raise EvalError(f"no LibriSpeech audio (SPEAKER-CHAPTER-NNNN.<ext>) under {directory}")
    return [(u, audio[u], transcripts.get(u)) for u in sorted(audio, key=_utterance_sort_key)]


def _speaker_of(utterance_id: str) -> Optional[str]:
    match = _UTTERANCE_ID.match(utterance_id)
    return match.group(1) if match else None


def _select(items: list, speakers: Optional[Sequence[str]], max_utterances: Optional[int], speaker_of) -> list:
    if speakers:
        wanted = {str(s) for s in speakers}
        items = [item for item in items if speaker_of(item) in wanted]
        if not items:
            raise EvalError(f"no utterance of speaker(s) {', '.join(sorted(wanted))}")
    if max_utterances is not None:
        items = items[:max_utterances]
    return items


def load_local(directory: Path, speakers=None, max_utterances=None) -> list[Utterance]:
    """Select utterances of a local LibriSpeech tree and decode their audio (once, up front)."""
    items = _select(find_librispeech(directory), speakers, max_utterances, lambda item: _speaker_of(item[0]))
    return [
        Utterance(id=utt, speaker=_speaker_of(utt), audio=load_audio(path), reference=text, source=str(path))
        for utt, path, text in items
    ]


def _decode_audio_cell(cell: dict, name: str) -> np.ndarray:
    """A `datasets` Audio cell read with decode=False ({"bytes", "path"}) → 16 kHz float32."""
    data, path = cell.get("bytes"), cell.get("path")
    if data is None:
        if path and Path(path).is_file():
            return load_audio(path)
        raise EvalError(f"{name}: the dataset row has neither audio bytes nor a readable file")
    # through a file, so that every format load_audio reads (and its resampling) applies
    suffix = Path(path).suffix if path else ".flac"
    with tempfile.NamedTemporaryFile(suffix=suffix) as handle:
        handle.write(data)
        handle.flush()
        return load_audio(handle.name)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection (assumed yes behind a proxy)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        endpoint = urlparse(constants.ENDPOINT)
    except Exception:
        endpoint = urlparse("https://huggingface.co")
    try:
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Offline mode for `datasets` and `huggingface_hub` (cache only, no retries) while active."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def load_hf(name: str, config: Optional[str], split: str, speakers=None, max_utterances=None) -> list[Utterance]:
    """Utterances of a Hugging Face dataset (e.g. openslr/librispeech_asr, clean, test).

    Works when the hub is reachable or the dataset is in the local `datasets` cache (or `name` is
    a local dataset directory). Audio is decoded by crosswhisper's loader, not by `datasets`.
    """
    try:
        import datasets
    except ImportError as error:
        raise EvalError(f"--hf-dataset needs the `datasets` package: pip install -e \".[eval]\" ({error})") from None
    local = Path(name).expanduser().exists()
    offline = not local and not _hub_reachable()
    if offline:
        logger.info("the Hugging Face hub is unreachable: looking for %s in the local datasets cache", name)
    try:
        with _hub_offline(offline):
            dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # offline, unknown name/config/split, not cached: one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        where = "the Hugging Face hub is unreachable and it is not in the local cache" if offline else "load_dataset failed"
        raise EvalError(
            f"cannot load dataset {name!r} (config {config!r}, split {split!r}): {where} "
            f"({type(error).__name__}: {first[:300]})"
        ) from None
    columns = dataset.column_names
    audio_column = "audio" if "audio" in columns else next(
        (c for c, f in dataset.features.items() if isinstance(f, datasets.Audio)), None
    )
    if audio_column is None:
        raise EvalError(f"dataset {name!r} has no audio column (columns: {', '.join(columns)})")
    text_column = next((c for c in _HF_TEXT_COLUMNS if c in columns), None)
    if text_column is None:
        logger.warning("dataset %s has no transcript column (%s): timed but not scored", name, "/".join(_HF_TEXT_COLUMNS))
    if isinstance(dataset.features.get(audio_column), datasets.Audio):
        dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
    if speakers:
        if "speaker_id" not in columns:
            raise EvalError(f"--speakers: dataset {name!r} has no speaker_id column")
        wanted = {str(s) for s in speakers}
        dataset = dataset.filter(lambda row: str(row["speaker_id"]) in wanted)
        if len(dataset) == 0:
            raise EvalError(f"no utterance of speaker(s) {', '.join(sorted(wanted))} in {name!r}")
    if max_utterances is not None:
        dataset = dataset.select(range(min(max_utterances, len(dataset))))
    utterances = []
    for index, row in enumerate(dataset):
        utt = str(row.get("id", f"{split}-{index}"))
        cell = row[audio_column]
        if isinstance(cell, dict) and ("bytes" in cell or "path" in cell) and cell.get("array") is None:
            audio = _decode_audio_cell(cell, utt)
        elif isinstance(cell, dict) and cell.get("array") is not None:  # already decoded
            import librosa

            audio = np.asarray(cell["array"], dtype=np.float32)
            if cell.get("sampling_rate", SAMPLE_RATE) != SAMPLE_RATE:
                audio = librosa.resample(audio, orig_sr=cell["sampling_rate"], target_sr=SAMPLE_RATE)
            audio = load_audio(audio.astype(np.float32))
        else:
            raise EvalError(f"{utt}: unsupported audio cell {type(cell).__name__}")
        speaker = str(row["speaker_id"]) if "speaker_id" in row else _speaker_of(utt)
        reference = str(row[text_column]) if text_column else None
        utterances.append(Utterance(id=utt, speaker=speaker, audio=audio, reference=reference, source=f"{name}[{index}]"))
    if not utterances:
        raise EvalError(f"dataset {name!r} split {split!r} holds no utterance")
    return utterances


# --------------------------------------------------------------------------------------------
# Device, machine, versions
# --------------------------------------------------------------------------------------------


def sync_device(device: str) -> None:
    """Wait for the device's queued work (GPU kernels run asynchronously), before reading a clock."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info(device: str) -> dict:
    """Where the figures were measured."""
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "gpu": None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def busy_cores(seconds: float = 1.0) -> Optional[float]:
    """How many cores other processes keep busy right now (Linux /proc/stat; None elsewhere)."""

    def busy_jiffies() -> int:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait (guest is in user)

    try:
        tick = os.sysconf("SC_CLK_TCK")
        before, own_before, t0 = busy_jiffies(), time.process_time(), time.perf_counter()
        time.sleep(seconds)
        after, own_after, t1 = busy_jiffies(), time.process_time(), time.perf_counter()
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return max(0.0, ((after - before) / tick - (own_after - own_before)) / (t1 - t0))


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "crosswhisper": getattr(crosswhisper, "__version__", None) or _version("crosswhisper"),
        "faster-whisper": _version("faster-whisper"),
        "ctranslate2": _version("ctranslate2"),
        "jiwer": _version("jiwer"),
        "whisper-normalizer": _version("whisper-normalizer"),
    }


"""LibriSpeech evaluation: WER, tokens per forward and speed of every decoding system, one run.

The published table comes from (2-core CPU, bundled tiny.en, the shipped adapter):

    python eval/librispeech.py --model tiny.en

Every system decodes the same utterances in ONE process: each utterance's audio is loaded into
memory once up front, every system runs once on the first utterance as a warm-up (not counted),
then for each utterance every system runs in turn (interleaved), so that a slow or noisy stretch
of the machine hits all systems alike. Speed figures are ratios against the reference system of
the same run (DESIGN §4); absolute seconds on a shared CPU are context, not the result.

Systems:
  generate (reference)   transcribe(adapter=None): transformers' greedy `generate`
  own loop γ=0           transcribe(adapter=None, gamma=0): crosswhisper's lean AR loop
  crosswhisper lossless  transcribe(adapter=<shipped or --adapter>, gamma=G): exact; G defaults
                         to transcribe()'s own default for the device (3 on a CPU, 4 on a GPU)
  crosswhisper lossy     the same with β, τ from --lossy (faster, may change the text)
  faster-whisper         CTranslate2 on the very same weights, float32 and int8, greedy

WER is corpus-level (Whisper's EnglishTextNormalizer with its spelling map, then jiwer) over the
utterances that have a transcript; "mismatches" counts utterances whose generated token ids
differ from the reference system's. Output: results.json, results.md, speed_vs_wer.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import crosswhisper  # noqa: E402
from crosswhisper.audio import SAMPLE_RATE, load_audio  # noqa: E402
from crosswhisper.metrics import word_error_rate  # noqa: E402
from crosswhisper.models import BUNDLED_MODELS, WhisperBundle, bundled_model_dir  # noqa: E402
from crosswhisper.whisper import (  # noqa: E402
    AdaptedModel,
    default_gamma,
    get_bundle,
    load_adapter,
    shipped_adapter_for,
    special_id,
    transcribe,
)

logger = logging.getLogger("crosswhisper.eval.librispeech")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "LibriSpeech" / "test-clean"
DEFAULT_LOSSY = ("0.5,0", "0,-4", "0,-8")
DEFAULT_FW_COMPUTE_TYPES = ("float32", "int8")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REFERENCE = "generate"  # id of the system every ratio and mismatch count refers to

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
    SPEAKER-CHAPTER-NNNN.<ext>; the audio may be in any format soundfile/librosa read (flac,
    opus, wav, ...). `directory` may be one subset (test-clean) or a folder holding several.
    Audio without a transcript line is kept (reference None); a transcript line without audio
    is reported and skipped.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise EvalError(f"LibriSpeech directory not found: {directory} (give --data DIR or --hf-dataset NAME)")
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
        raise EvalError(f"--hf-dataset needs the `datasets` package ({error})") from None
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
# Systems
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What one system produced on one utterance."""

    tokens: tuple[int, ...]  # text token ids (no prompt, no end-of-text)
    text: str
    e2e_seconds: float  # wall time of the whole call, audio already in memory
    encode_seconds: Optional[float]  # None where the system does not report it
    decode_seconds: Optional[float]
    generated_tokens: Optional[int]  # end-of-text included (crosswhisper's DecodingStats)
    forward_calls: Optional[int]
    acceptance_histogram: tuple[int, ...] = ()


@dataclasses.dataclass
class System:
    """A named decoding system: `run(audio)` transcribes one utterance."""

    id: str  # stable key for results.json
    name: str  # human label for tables and plots
    family: str  # reference | baseline | lossless | lossy | faster-whisper
    settings: dict
    run: Callable[[np.ndarray], Run] = dataclasses.field(repr=False)


def sync_device(device: str) -> None:
    """Wait for the device's queued work (GPU kernels run asynchronously), before reading a clock."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def crosswhisper_system(id_, name, family, settings, bundle: WhisperBundle, device: str, **kwargs) -> System:
    """A system that calls `crosswhisper.transcribe(audio, model=bundle, **kwargs)`."""

    def run(audio: np.ndarray) -> Run:
        sync_device(device)
        t0 = time.perf_counter()
        result = transcribe(audio, model=bundle, device=device, **kwargs)
        sync_device(device)
        e2e = time.perf_counter() - t0
        s = result.stats
        return Run(
            tokens=tuple(result.tokens),
            text=result.text,
            e2e_seconds=e2e,
            encode_seconds=s.encode_seconds,
            decode_seconds=s.decode_seconds,
            generated_tokens=s.generated_tokens,
            forward_calls=s.forward_calls,
            acceptance_histogram=tuple(s.acceptance_histogram),
        )

    return System(id=id_, name=name, family=family, settings=settings, run=run)


FASTER_WHISPER_OPTIONS = dict(
    beam_size=1,
    without_timestamps=True,
    vad_filter=False,
    condition_on_previous_text=False,
    temperature=0,
)
_WORKER_FLAG = "--faster-whisper-worker"


def faster_whisper_worker(ct2_dir: str, compute_type: str, device: str, threads: int) -> int:
    """Child-process loop: a pickled audio array in on stdin → pickled (tokens per segment, texts,
    seconds) out on stdout, until stdin closes. The call alone is timed."""
    import pickle

    from faster_whisper import WhisperModel

    out = os.fdopen(os.dup(1), "wb")  # the results channel; anything printed goes to stderr
    os.dup2(2, 1)
    model = WhisperModel(ct2_dir, device=device, compute_type=compute_type, cpu_threads=threads)
    while True:
        try:
            audio = pickle.load(sys.stdin.buffer)
        except EOFError:
            return 0
        t0 = time.perf_counter()
        segments = list(model.transcribe(audio, **FASTER_WHISPER_OPTIONS)[0])  # the generator does the work
        seconds = time.perf_counter() - t0
        pickle.dump(([list(s.tokens) for s in segments], [s.text for s in segments], seconds), out)
        out.flush()


def faster_whisper_system(ct2_dir: Path, compute_type: str, device: str, eot: int) -> System:
    """faster-whisper greedy on a CTranslate2 directory, options matching the reference decode.

    It runs in a child process driven utterance by utterance (still interleaved with the other
    systems): CTranslate2's OpenMP threads in the same process as torch's slowed the torch
    systems measured after it (tiny.en, 2-core CPU: lossless decode 1.41 s alone, 2.26 s with
    faster-whisper loaded beside it). The child's threads wait passively between calls.
    """
    import atexit
    import pickle
    import subprocess

    threads = torch.get_num_threads()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    worker = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), _WORKER_FLAG, str(ct2_dir), compute_type, device, str(threads)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
    )
    atexit.register(worker.kill)

    def run(audio: np.ndarray) -> Run:
        pickle.dump(np.ascontiguousarray(audio, dtype=np.float32), worker.stdin)
        worker.stdin.flush()
        try:
            segment_tokens, texts, seconds = pickle.load(worker.stdout)
        except EOFError:
            raise EvalError(f"the faster-whisper {compute_type} worker died (exit {worker.wait()})") from None
        tokens = tuple(t for seg in segment_tokens for t in seg if t < eot)
        text = " ".join(t.strip() for t in texts if t.strip())
        return Run(
            tokens=tokens,
            text=text,
            e2e_seconds=seconds,
            encode_seconds=None,  # CTranslate2 does not expose the encoder/decoder split
            decode_seconds=None,
            generated_tokens=None,
            forward_calls=None,
        )

    settings = {"compute_type": compute_type, "cpu_threads": threads, "model_dir": str(ct2_dir),
                "process": "separate, OMP_WAIT_POLICY=PASSIVE", **FASTER_WHISPER_OPTIONS}
    return System(
        id=f"faster_whisper_{compute_type}",
        name=f"faster-whisper {compute_type}",
        family="faster-whisper",
        settings=settings,
        run=run,
    )


def parse_lossy(pairs: Sequence[str]) -> list[tuple[float, float]]:
    """["0.5,0", "0,-4"] → [(0.5, 0.0), (0.0, -4.0)] (β in [0, 1), τ ≤ 0)."""
    grid = []
    for pair in pairs:
        try:
            beta, tau = (float(x) for x in pair.split(","))
        except ValueError:
            raise EvalError(f"--lossy takes beta,tau pairs such as 0.5,0 or 0,-4; got {pair!r}") from None
        if not (0 <= beta < 1 and tau <= 0):
            raise EvalError(f"--lossy {pair}: need 0 ≤ beta < 1 and tau ≤ 0")
        if beta == 0 and tau == 0:
            logger.warning("--lossy 0,0 is the lossless rule; it duplicates the lossless system")
        grid.append((beta, tau))
    return grid


def _number(x: float) -> str:
    return f"{x:g}"


def faster_whisper_dir(model: str) -> Optional[Path]:
    """The CTranslate2 directory holding `model`'s weights, or None if there is none."""
    if model in BUNDLED_MODELS:
        return bundled_model_dir(model)
    path = Path(model).expanduser()
    if path.is_dir() and (path / "model.bin").is_file():
        return path.resolve()
    return None


def build_systems(args, bundle: WhisperBundle, adapted: Optional[AdaptedModel]) -> list[System]:
    """The systems to compare, reference first, in the order they run on every utterance."""
    device = args.device
    systems = [
        crosswhisper_system(REFERENCE, "generate (reference)", "reference", {"adapter": None},
                            bundle, device, adapter=None),
        crosswhisper_system("own_loop", "own loop γ=0", "baseline", {"adapter": None, "gamma": 0},
                            bundle, device, adapter=None, gamma=0),
    ]
    if adapted is not None:
        systems.append(crosswhisper_system(
            "lossless", f"crosswhisper lossless γ={args.gamma}", "lossless",
            {"gamma": args.gamma, "beta": 0.0, "tau": 0.0}, bundle, device, adapter=adapted, gamma=args.gamma,
        ))
        for beta, tau in ([] if args.no_lossy else parse_lossy(args.lossy)):
            systems.append(crosswhisper_system(
                f"lossy_beta{_number(beta)}_tau{_number(tau)}",
                f"crosswhisper lossy β={_number(beta)}, τ={_number(tau)}", "lossy",
                {"gamma": args.gamma, "beta": beta, "tau": tau},
                bundle, device, adapter=adapted, gamma=args.gamma, beta=beta, tau=tau,
            ))
    if not args.no_faster_whisper:
        try:
            import faster_whisper  # noqa: F401
        except ImportError:
            logger.warning("faster-whisper is not installed: its systems are skipped (pip install faster-whisper)")
        else:
            ct2_dir = faster_whisper_dir(args.model)
            if ct2_dir is None:
                logger.warning("%s has no CTranslate2 weights: faster-whisper is skipped", args.model)
            else:
                eot = special_id(bundle, "<|endoftext|>")
                for compute_type in args.fw_compute_types:
                    systems.append(faster_whisper_system(ct2_dir, compute_type, device, eot))
    return systems


# --------------------------------------------------------------------------------------------
# Running and summarising
# --------------------------------------------------------------------------------------------


def run_all(systems: list[System], utterances: list[Utterance], progress: bool = True) -> dict[str, list[Run]]:
    """Warm every system up on the first utterance, then run all systems per utterance in turn."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    logger.info("warm-up on %s (not counted)", utterances[0].id)
    for system in systems:
        t0 = time.perf_counter()
        system.run(utterances[0].audio)
        logger.debug("warm-up of %s: %.2f s", system.name, time.perf_counter() - t0)
    runs: dict[str, list[Run]] = {system.id: [] for system in systems}
    with logging_redirect_tqdm():
        for utterance in tqdm(utterances, desc="utterances", unit="utt", disable=not progress):
            for system in systems:  # interleaved: every system on this utterance, in turn
                runs[system.id].append(system.run(utterance.audio))
    return runs


def _sum_or_none(values: list[Optional[float]]):
    return None if any(v is None for v in values) else sum(values)


def _ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator else None


def summarise(systems: list[System], utterances: list[Utterance], runs: dict[str, list[Run]]) -> list[dict]:
    """Per-system totals, WER, mismatches against the reference and ratios against it."""
    audio_seconds = sum(u.seconds for u in utterances)
    scored = [i for i, u in enumerate(utterances) if u.reference is not None and u.reference.strip()]
    reference_runs = runs[REFERENCE]
    rows = []
    for system in systems:
        system_runs = runs[system.id]
        wer = None
        if scored:
            wer = word_error_rate([utterances[i].reference for i in scored], [system_runs[i].text for i in scored])
        mismatched = [u.id for u, r, ref in zip(utterances, system_runs, reference_runs) if r.tokens != ref.tokens]
        generated = _sum_or_none([r.generated_tokens for r in system_runs])
        calls = _sum_or_none([r.forward_calls for r in system_runs])
        if system.family == "faster-whisper":
            tokens_per_forward = 1.0  # one token per decoder step by construction (greedy)
        else:
            tokens_per_forward = _ratio(generated, calls)
        histogram: list[int] = []
        for r in system_runs:
            for i, count in enumerate(r.acceptance_histogram):
                histogram += [0] * (i + 1 - len(histogram))
                histogram[i] += count
        e2e = sum(r.e2e_seconds for r in system_runs)
        rows.append({
            "id": system.id,
            "name": system.name,
            "family": system.family,
            "settings": system.settings,
            "wer": wer,
            "wer_percent": None if wer is None else 100 * wer,
            "scored_utterances": len(scored),
            "tokens_per_forward": tokens_per_forward,
            "generated_tokens": generated,
            "forward_calls": calls,
            "text_tokens": sum(len(r.tokens) for r in system_runs),
            "mismatches": len(mismatched),
            "mismatched_utterances": mismatched,
            "encode_seconds": _sum_or_none([r.encode_seconds for r in system_runs]),
            "decode_seconds": _sum_or_none([r.decode_seconds for r in system_runs]),
            "e2e_seconds": e2e,
            "audio_seconds": audio_seconds,
            "rtfx": audio_seconds / e2e if e2e else None,
            "acceptance_histogram": histogram if system.family in ("lossless", "lossy") else None,
        })
    reference = rows[0]
    for row in rows:
        row["e2e_speedup_vs_reference"] = _ratio(reference["e2e_seconds"], row["e2e_seconds"])
        row["decode_speedup_vs_reference"] = _ratio(reference["decode_seconds"], row["decode_seconds"])
    return rows


def per_utterance(systems: list[System], utterances: list[Utterance], runs: dict[str, list[Run]]) -> list[dict]:
    """results.json's `utterances`: every system's tokens, text and timings on every utterance."""
    items = []
    for i, utterance in enumerate(utterances):
        reference_tokens = runs[REFERENCE][i].tokens
        items.append({
            "id": utterance.id,
            "speaker": utterance.speaker,
            "source": utterance.source,
            "audio_seconds": utterance.seconds,
            "reference": utterance.reference,
            "systems": {
                system.id: {
                    "text": runs[system.id][i].text,
                    "tokens": list(runs[system.id][i].tokens),
                    "matches_reference": runs[system.id][i].tokens == reference_tokens,
                    "e2e_seconds": runs[system.id][i].e2e_seconds,
                    "encode_seconds": runs[system.id][i].encode_seconds,
                    "decode_seconds": runs[system.id][i].decode_seconds,
                    "generated_tokens": runs[system.id][i].generated_tokens,
                    "forward_calls": runs[system.id][i].forward_calls,
                }
                for system in systems
            },
        })
    return items


# --------------------------------------------------------------------------------------------
# Context: machine, versions
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(report: dict) -> str:
    """The summary table (one row per system) with a one-line caption of what was measured."""
    s = report["settings"]
    m = report["machine"]
    where = m["gpu"] or f"{m['cpu_model'] or m['machine']}, {m['torch_threads']} threads"
    lines = [
        f"{report['model']} on {s['data_label']}: {s['utterances']} utterances, {s['audio_seconds']:.1f} s of audio; "
        f"{where}; γ={s['gamma']}; ratios vs generate (reference) from this run",
        "",
        "| system | WER % | tokens/fwd | mismatches | enc s | dec s | e2e s | RTFx | e2e × ref | decode × ref |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    n = s["utterances"]
    for row in report["systems"]:
        lines.append(
            f"| {row['name']} | {_fmt(row['wer_percent'], '.2f')} | {_fmt(row['tokens_per_forward'], '.2f')} "
            f"| {row['mismatches']}/{n} | {_fmt(row['encode_seconds'], '.2f')} | {_fmt(row['decode_seconds'], '.2f')} "
            f"| {row['e2e_seconds']:.2f} | {_fmt(row['rtfx'], '.1f')} | {_fmt(row['e2e_speedup_vs_reference'], '.2f')} "
            f"| {_fmt(row['decode_speedup_vs_reference'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


_FAMILY_STYLE = {
    "reference": ("black", "s"),
    "baseline": ("tab:gray", "D"),
    "lossless": ("tab:green", "o"),
    "lossy": ("tab:orange", "^"),
    "faster-whisper": ("tab:blue", "P"),
}

# label positions tried around a point, in points: (dx, dy, horizontal alignment, vertical alignment)
_LABEL_SPOTS = [
    (dx * sx, dy * sy, "left" if sx > 0 else "right", "bottom" if sy > 0 else "top")
    for dx, dy in ((7, 5), (7, 20), (7, 36), (7, 52))
    for sy in (1, -1)
    for sx in (1, -1)
]


def _place_labels(ax, points: list[tuple[float, float]], labels: list[str], colors: list[str]) -> None:
    """Put each label beside its point where it overlaps no other label, point or the axes' edge."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    taken = []
    for x, y in points:  # the markers themselves
        px, py = ax.transData.transform((x, y))
        taken.append((px - 6, py - 6, px + 6, py + 6))
    frame = ax.get_window_extent(renderer)
    for (x, y), label, color in zip(points, labels, colors):
        best = None
        for dx, dy, ha, va in _LABEL_SPOTS:
            text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                               fontsize=7.5, color=color, arrowprops=None)
            box = text.get_window_extent(renderer)
            box = (box.x0 - 2, box.y0 - 1, box.x1 + 2, box.y1 + 1)
            overlap = sum(
                max(0.0, min(box[2], o[2]) - max(box[0], o[0])) * max(0.0, min(box[3], o[3]) - max(box[1], o[1]))
                for o in taken
            )
            outside = (max(0.0, frame.x0 - box[0]) + max(0.0, box[2] - frame.x1)
                       + max(0.0, frame.y0 - box[1]) + max(0.0, box[3] - frame.y1))
            cost = overlap + 1000 * outside + 0.01 * abs(dy)  # prefer close, free, inside spots
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box)
            else:
                text.remove()
            if cost < 1:
                break
        if abs(best[1].xyann[1]) > 12:  # moved away from its point: draw a thin leader line
            best[1].remove()
            dx, dy = best[1].xyann
            text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy),
                               ha=best[1].get_ha(), va=best[1].get_va(), fontsize=7.5, color=color,
                               arrowprops=dict(arrowstyle="-", color=color, lw=0.5, alpha=0.6, shrinkA=0, shrinkB=4))
        taken.append(best[2])


def plot(report: dict, path: Path) -> None:
    """speed_vs_wer.png: WER % against RTFx (bottom axis) and speed-up vs the reference (top axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["systems"] if r["rtfx"]]
    ref_rtfx = report["systems"][0]["rtfx"]
    n = report["settings"]["utterances"]
    fig, ax = plt.subplots(figsize=(9.5, 6), dpi=120, layout="constrained")
    points, labels, colors = [], [], []
    for row in rows:
        color, marker = _FAMILY_STYLE.get(row["family"], ("tab:purple", "o"))
        y = row["wer_percent"] if row["wer_percent"] is not None else 0.0
        seen = ax.get_legend_handles_labels()[1]
        ax.scatter(row["rtfx"], y, s=70, color=color, marker=marker, zorder=3, edgecolors="white", linewidths=0.5,
                   label=row["family"] if row["family"] not in seen else None)
        details = []
        if row["family"] in ("lossless", "lossy") and row["tokens_per_forward"]:
            details.append(f"{row['tokens_per_forward']:.2f} tok/fwd")
        if row["mismatches"]:
            details.append(f"{row['mismatches']}/{n} utt. differ")
        points.append((row["rtfx"], y))
        labels.append(row["name"] + ("\n" + ", ".join(details) if details else ""))
        colors.append(color)
    if ref_rtfx:
        ax.axvline(ref_rtfx, color="black", lw=0.6, ls=":", zorder=1)
        top = ax.secondary_xaxis("top", functions=(lambda x: x / ref_rtfx, lambda s: s * ref_rtfx))
        top.set_xlabel("end-to-end speed-up vs generate (reference), same run")
    ax.set_xlabel("RTFx = audio seconds / end-to-end seconds   (→ faster)")
    ax.set_ylabel("WER %   (↓ better)")
    wers = [y for _, y in points]
    ax.set_ylim(0, max(wers, default=1.0) * 1.3 + 0.5)
    xs = [x for x, _ in points]
    span = max(xs) - min(xs) or max(xs)
    ax.set_xlim(min(xs) - 0.15 * span, max(xs) + 0.35 * span)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8, frameon=True)
    s, m = report["settings"], report["machine"]
    where = m["gpu"] or f"{m['cpu_model'] or m['machine']}, {m['torch_threads']} threads"
    fig.suptitle(
        f"Whisper {report['model']} on {s['data_label']} ({n} utterances, {s['audio_seconds']:.0f} s of audio)"
        f" — {where}",
        fontsize=10,
    )
    fig.canvas.draw()  # fixes the layout, so that label boxes can be measured
    _place_labels(ax, points, labels, colors)
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="eval/librispeech.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, default=DEFAULT_DATA,
                      help="local LibriSpeech directory (SPEAKER/CHAPTER/*.trans.txt + audio); default %(default)s")
    data.add_argument("--hf-dataset", metavar="NAME", help="a Hugging Face dataset instead, e.g. openslr/librispeech_asr")
    data.add_argument("--hf-config", metavar="CFG", default=None, help="its configuration, e.g. clean")
    data.add_argument("--hf-split", metavar="SPLIT", default="test", help="its split (default %(default)s)")
    data.add_argument("--max-utterances", type=int, metavar="N", help="the first N utterances (after --speakers)")
    data.add_argument("--speakers", nargs="+", metavar="ID", help="only these speakers")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="tiny.en", help="any name get_bundle accepts (default %(default)s)")
    model.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    model.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    model.add_argument("--threads", type=int, help="torch.set_num_threads (faster-whisper uses the same count)")
    systems = parser.add_argument_group("systems")
    systems.add_argument("--adapter", default=None,
                         help="peft adapter directory (default: the adapter shipped in crosswhisper/adapters/ "
                              "for the model's weights); 'none' runs the baselines only")
    systems.add_argument("--gamma", type=int, default=None,
                         help="draft slots per call (default: transcribe()'s default for the device, "
                              "3 on a CPU and 4 on a GPU)")
    systems.add_argument("--lossy", nargs="+", default=list(DEFAULT_LOSSY), metavar="BETA,TAU",
                         help="lossy settings to run (default: %(default)s)")
    systems.add_argument("--no-lossy", action="store_true", help="skip the lossy systems")
    systems.add_argument("--no-faster-whisper", action="store_true", help="skip faster-whisper")
    systems.add_argument("--fw-compute-types", nargs="+", default=list(DEFAULT_FW_COMPUTE_TYPES), metavar="TYPE",
                         help="faster-whisper compute types (default: %(default)s)")
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", type=Path,
                     help="default: results/librispeech-<model>-<timestamp> in the repository")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    if args.gamma is not None and args.gamma < 1:
        parser.error("--gamma must be ≥ 1 (γ=0 is already the 'own loop' baseline)")
    if args.max_utterances is not None and args.max_utterances < 1:
        parser.error("--max-utterances must be ≥ 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be ≥ 1")
    return args


def _model_label(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name if os.sep in model else model) or "model"


def adapter_option(args) -> Optional[Path]:
    """--adapter DIR checked before anything is loaded; None for 'none' or the default."""
    if args.adapter is None or args.adapter.lower() == "none":
        return None
    directory = Path(args.adapter).expanduser()
    if not (directory / "adapter_config.json").is_file():
        raise EvalError(f"--adapter {directory}: not a peft adapter directory (no adapter_config.json); "
                        "pass --adapter none for the baselines only")
    return directory.resolve()


def default_adapter(bundle: WhisperBundle, model: str) -> Path:
    """The adapter shipped for exactly these base weights (what transcribe(adapter="auto") uses)."""
    directory = shipped_adapter_for(bundle)
    if directory is None:
        raise EvalError(f"no adapter ships for {model!r} (weights {str(bundle.weights_sha256)[:12]}): "
                        "pass --adapter DIR, or --adapter none for the baselines only")
    return directory.resolve()


def main(argv=None) -> int:
    """Run the evaluation; returns the process exit status (0 ok, 2 for a user-fixable problem)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [_WORKER_FLAG]:
        ct2_dir, compute_type, device, threads = argv[1:5]
        return faster_whisper_worker(ct2_dir, compute_type, device, int(threads))
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(args.log_level)
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # one INFO line per call otherwise
    try:
        return _main(args)
    except EvalError as error:
        logger.error("%s", error)
        return 2


def _main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: torch sees no CUDA device")
    adapter_dir = adapter_option(args)

    if args.hf_dataset:
        data_label = " ".join(x for x in (args.hf_dataset, args.hf_config, args.hf_split) if x)
        data_source = {"kind": "huggingface", "name": args.hf_dataset, "config": args.hf_config, "split": args.hf_split}
        utterances = load_hf(args.hf_dataset, args.hf_config, args.hf_split, args.speakers, args.max_utterances)
    else:
        data_label = args.data.name or str(args.data)
        data_source = {"kind": "local", "path": str(args.data.resolve())}
        utterances = load_local(args.data, args.speakers, args.max_utterances)
    audio_seconds = sum(u.seconds for u in utterances)
    logger.info("%d utterances, %.1f s of audio from %s", len(utterances), audio_seconds, data_label)

    bundle = get_bundle(args.model, device=args.device, dtype=DTYPES[args.dtype])
    if args.adapter is None:
        adapter_dir = default_adapter(bundle, args.model)
    adapted = load_adapter(bundle, adapter_dir) if adapter_dir is not None else None
    if args.gamma is None:
        args.gamma = default_gamma(args.device)
    logger.info("adapter %s, γ=%d", adapter_dir, args.gamma)
    systems = build_systems(args, bundle, adapted)
    logger.info("systems: %s", ", ".join(s.name for s in systems))

    busy = busy_cores()
    if busy is not None and busy >= 0.3:
        logger.warning("other processes keep %.1f of %d cores busy: times are inflated and even the "
                       "ratios get noisier; measure on a quiet machine", busy, os.cpu_count() or 0)
    started = datetime.datetime.now()
    runs = run_all(systems, utterances, progress=not args.no_progress)
    rows = summarise(systems, utterances, runs)

    report = {
        "machine": {**machine_info(args.device), "busy_cores_before": busy},
        "versions": versions(),
        "model": args.model,
        "model_source": bundle.source,
        "weights_sha256": bundle.weights_sha256,
        "dtype": args.dtype,
        "adapter": str(adapter_dir) if adapter_dir else None,
        "started": started.isoformat(timespec="seconds"),
        "settings": {
            "gamma": args.gamma,
            "lossy": [] if (args.no_lossy or adapted is None) else [list(p) for p in parse_lossy(args.lossy)],
            "faster_whisper_compute_types": [s.settings["compute_type"] for s in systems if s.family == "faster-whisper"],
            "data": data_source,
            "data_label": data_label,
            "speakers": args.speakers,
            "max_utterances": args.max_utterances,
            "utterances": len(utterances),
            "scored_utterances": sum(1 for u in utterances if u.reference is not None and u.reference.strip()),
            "audio_seconds": audio_seconds,
            "warmup_utterance": utterances[0].id,
            "reference_system": REFERENCE,
            "order": "interleaved per utterance, systems in the order listed, after one warm-up run each",
            "wer": "corpus WER, Whisper EnglishTextNormalizer (whisper-normalizer) + jiwer",
        },
        "systems": rows,
        "utterances": per_utterance(systems, utterances, runs),
    }
    output_dir = args.output_dir or REPO / "results" / f"librispeech-{_model_label(args.model)}-{started:%Y%m%d-%H%M%S}"
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table = markdown_table(report)
    (output_dir / "results.md").write_text(table, encoding="utf-8")
    plot(report, output_dir / "speed_vs_wer.png")
    logger.info("wrote %s", output_dir)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

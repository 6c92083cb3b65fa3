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
import dataclasses
import datetime
import importlib.util
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from crosswhisper.engine import default_gamma as _default_gamma
from crosswhisper.lora import AdaptedModel, load_adapter, shipped_adapter_for
from crosswhisper.whisper import (
    BUNDLED_MODELS,
    DEFAULT_GAMMA,
    WhisperBundle,
    bundled_model_dir,
    get_bundle,
    special_id,
    transcribe,
)

# the modules beside this script (its folder is on sys.path when it runs as `python eval/librispeech.py`)
from common import (
    DEFAULT_DATA,
    DTYPES,
    REPO,
    EvalError,
    Utterance,
    busy_cores,
    find_librispeech,  # noqa: F401  (part of this script's interface, e.g. for tests)
    load_hf,
    load_local,
    machine_info,
    sync_device,
    versions,
)
from faster_whisper_worker import FASTER_WHISPER_OPTIONS, Worker, WorkerDied
from report import REFERENCE, markdown_table, per_utterance, plot, summarise


def default_gamma(device) -> int:
    return _default_gamma(DEFAULT_GAMMA, device)


logger = logging.getLogger("crosswhisper.eval.librispeech")

DEFAULT_LOSSY = ("0.5,0", "0,-4", "0,-8")
DEFAULT_FW_COMPUTE_TYPES = ("float32", "int8")


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


def faster_whisper_system(ct2_dir: Path, compute_type: str, device: str, eot: int) -> System:
    """faster-whisper greedy on a CTranslate2 directory, options matching the reference decode.

    It runs in a child process driven utterance by utterance (eval/faster_whisper_worker.py
    says why), with torch's thread count.
    """
    threads = torch.get_num_threads()
    worker = Worker(ct2_dir, compute_type, device, threads)

    def run(audio: np.ndarray) -> Run:
        try:
            segment_tokens, texts, seconds = worker.transcribe(audio)
        except WorkerDied as error:
            raise EvalError(f"the faster-whisper {compute_type} worker died ({error})") from None
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
            logger.warning("faster-whisper is not installed: its systems are skipped (pip install -e \".[eval]\")")
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
# Running
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
    if importlib.util.find_spec("matplotlib") is None:  # checked before the run, not after it
        raise EvalError('the speed-vs-WER plot needs matplotlib: pip install -e ".[eval]"')

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

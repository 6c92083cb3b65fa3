"""The Whisper recipe under `accelerate launch` on 2 processes: killed after a checkpoint,
relaunched, it resumes and exports an adapter that decodes losslessly."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crosswhisper.decoding import DecodeOptions
from crosswhisper.lora import load_adapter
from crosswhisper.training import Processes, TrainingConfig, prepare_examples, train
from crosswhisper.whisper import decode_window, decoder_prompt, encode, generate_greedy, get_bundle

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_command(work: Path) -> list[str]:
    # --multi_gpu is what makes `accelerate launch` start the processes (torchrun), GPUs or not:
    # with --cpu it runs a single one unless given an MPI host file
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(ROOT / "recipes" / "train_whisper_adapter.py"), "--model", "tiny.en",
        "--train-data", str(ROOT / "tests/data/LibriSpeech/test-clean"), "--test-data", str(ROOT / "tests/data/LibriSpeech/test-clean"),
        "--dev-speakers", "1221", "--train-utterances", "5", "--dev-utterances", "2", "--steps", str(STEPS),
        "--gamma", "4", "--rank", "8", "--eval-gammas", "4", "--checkpoint-every", "2",
        "--work-dir", str(work), "--output", str(work / "adapter"),
    ]


def _checkpoint_step(work: Path) -> int:
    states = list(work.glob("run-*/checkpoint/state.pt"))
    return torch.load(states[0], weights_only=False)["step"] if states else 0


def _kill_everything(job: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group and its workers (torchrun starts each worker in a
    session of its own: killing the launcher alone would leave them training)."""
    import psutil

    workers = psutil.Process(job.pid).children(recursive=True)
    os.killpg(job.pid, signal.SIGKILL)
    for worker in workers:
        try:
            worker.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    job.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, alive


def test_single_process_needs_no_accelerate(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setitem(sys.modules, "accelerate", None)  # `import accelerate` would raise
    processes = Processes.from_environment()
    assert (processes.rank, processes.count, processes.is_main) == (0, 1, True)
    with processes.main_process_first():
        processes.wait()
    assert processes.gather("x") == ["x"]


def test_resume_needs_as_many_processes(test_clean, tmp_path):
    bundle = get_bundle("tiny.en")
    examples = prepare_examples(bundle, [test_clean[0][1]])
    config = TrainingConfig(gamma=4, rank=4, steps=1, cuts_per_utterance=2, utterances_per_step=1)
    train(bundle, examples, config, output_dir=tmp_path)
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)
    assert state["processes"] == 1
    torch.save({**state, "processes": 2}, tmp_path / "checkpoint" / "state.pt")  # as a 2-process run leaves it
    with pytest.raises(ValueError, match="2 process"):
        train(bundle, examples, config, output_dir=tmp_path)


@pytest.mark.slow  # ≈ 70 s: two launches of 2 processes, examples, evaluation
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate is not installed")
def test_recipe_under_accelerate_resumes_after_a_kill(tmp_path, test_clean, test_clean_audio):
    work = tmp_path / "work"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # 1. killed (launcher and both workers) once the checkpoint of step 2 or later is written
    with open(tmp_path / "first.log", "wb") as log:
        job = subprocess.Popen(_launch_command(work), env=env, cwd=ROOT, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while _checkpoint_step(work) < 2:
            assert job.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        _kill_everything(job)
    killed_at = _checkpoint_step(work)
    assert 2 <= killed_at < STEPS, "the kill came too late to test resumption"
    assert not (work / "adapter").exists()

    # 2. the relaunch resumes from that checkpoint and finishes
    rerun = subprocess.run(_launch_command(work), check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from step {killed_at}" in rerun.stderr
    assert "teacher transcripts" not in rerun.stderr  # the examples came from the first run's cache
    state = torch.load(next(work.glob("run-*/checkpoint/state.pt")), weights_only=False)
    assert state["step"] == STEPS and state["processes"] == 2
    # each process drew its own utterances, cuts and drafts
    assert not torch.equal(state["ranks"][0]["generator"], state["ranks"][1]["generator"])
    card = json.loads((work / "adapter" / "crosswhisper_adapter.json").read_text())
    assert card["training"]["processes"] == 2
    assert all(r["mismatches"] == 0 for split in card["tokens_per_forward"].values() for r in split)

    # 3. the adapter learnt something, and drafting with it is token-identical to greedy
    from safetensors.torch import load_file

    weights = load_file(work / "adapter" / "adapter_model.safetensors")
    assert any(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)
    bundle = get_bundle("tiny.en")
    adapted = load_adapter(bundle, work / "adapter")
    utt = test_clean[-1][0]  # speaker 1221: held out (dev)
    hidden = encode(bundle, test_clean_audio[utt])
    prompt = decoder_prompt(bundle, "en")
    result = decode_window(bundle, hidden, prompt, adapted=adapted, options=DecodeOptions(gamma=4))
    assert result.tokens == generate_greedy(bundle, hidden, prompt)[0]

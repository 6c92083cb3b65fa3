"""Many files: input collection, the failures manifest, and `--ray` (bulk transcription on a local
Ray cluster) against the plain CLI, with a bad file, a kill midway and reruns."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crosswhisper import cli
from crosswhisper.bulk import FAILURES_FILE, FailureLog, Job, collect_jobs, transcribe_files

from conftest import DATA, LANGUAGES, TEST_CLEAN


def test_collect_jobs_keeps_folder_structure_and_refuses_collisions(tmp_path):
    (tmp_path / "in" / "a" / "b").mkdir(parents=True)
    for name in ("in/x.wav", "in/a/y.flac", "in/a/b/z.mp4", "in/a/notes.txt", "other.mp3"):
        (tmp_path / name).write_bytes(b"")
    jobs = collect_jobs([tmp_path / "in", tmp_path / "other.mp3"])
    assert sorted((str(j.subdir), j.audio.name) for j in jobs) == [
        (".", "other.mp3"), (".", "x.wav"), ("a", "y.flac"), ("a/b", "z.mp4"),
    ]
    assert Job(tmp_path / "in/a/b/z.mp4", Path("a/b")).outputs("out", "all") == [
        Path("out/a/b/z." + ext) for ext in ("txt", "srt", "vtt", "json")
    ]
    # a manifest: paths relative to its folder, comments and blank lines skipped
    (tmp_path / "list.txt").write_text("# two files\nin/x.wav\n\nother.mp3\n")
    assert [j.audio for j in collect_jobs(manifest=tmp_path / "list.txt")] == [tmp_path / "in/x.wav", tmp_path / "other.mp3"]
    # the same file twice is one job; two files that would write the same transcript are refused
    assert len(collect_jobs([tmp_path / "other.mp3", tmp_path / "other.mp3"])) == 1
    (tmp_path / "in" / "other.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="same transcripts"):
        collect_jobs([tmp_path / "other.mp3", tmp_path / "in" / "other.wav"])
    # a missing file is a job (it fails when read, without stopping the others)
    assert collect_jobs([tmp_path / "missing.wav"]) == [Job(tmp_path / "missing.wav")]
    with pytest.raises(ValueError, match="cannot read manifest"):
        collect_jobs(manifest=tmp_path / "missing.txt")


def test_failure_log_keeps_earlier_failures_until_retried(tmp_path):
    bad, fixed = tmp_path / "bad.wav", tmp_path / "fixed.wav"
    log = FailureLog(tmp_path)
    log.add(bad, "AudioError: not audio")
    log.add(fixed, "AudioError: truncated")
    assert log.finish() == tmp_path / FAILURES_FILE
    lines = [json.loads(line) for line in (tmp_path / FAILURES_FILE).read_text().splitlines()]
    assert lines == [{"file": str(bad), "error": "AudioError: not audio"}, {"file": str(fixed), "error": "AudioError: truncated"}]
    again = FailureLog(tmp_path)
    again.retry(fixed)  # tried again and succeeded: no longer listed
    again.finish()
    assert [json.loads(line)["file"] for line in (tmp_path / FAILURES_FILE).read_text().splitlines()] == [str(bad)]
    third = FailureLog(tmp_path)
    third.retry(bad)
    assert third.finish() is None and not (tmp_path / FAILURES_FILE).exists()


def test_plain_cli_takes_folders(tmp_path, capsys):
    """Folders work without Ray too, their structure kept under --output-dir."""
    source = tmp_path / "in"
    shutil.copytree(TEST_CLEAN / "1221", source / "1221")
    assert cli.main([str(source), "-o", str(tmp_path / "out"), "-q", "--gamma", "0"]) == 0
    written = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.txt"))
    assert written == [Path("1221/135766/1221-135766-0001.txt"), Path("1221/135766/1221-135766-0002.txt")]
    with pytest.raises(SystemExit):
        cli.main(["-o", str(tmp_path / "out")])  # nothing to transcribe
    assert "give files, folders or --manifest" in capsys.readouterr().err


def _transcripts(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*.txt"))}


@pytest.mark.slow
def test_ray_bulk_matches_plain_cli_resumes_and_records_failures(tmp_path):
    """--ray on a local Ray cluster (this machine): a dozen real files in nested folders plus one
    that is not audio. Killed midway, rerun: the finished files are not redone, the rest are
    written, the bad file lands in failures.jsonl; the transcripts equal the plain CLI's; a
    further rerun does nothing."""
    pytest.importorskip("ray")
    source = tmp_path / "in"
    for path in sorted(TEST_CLEAN.rglob("*.flac")):  # 7 utterances
        (source / "librispeech").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, source / "librispeech" / path.name)
    for lang in LANGUAGES:  # 3 non-English clips: fallback temperatures, so seeded
        (source / "languages").mkdir(exist_ok=True)
        shutil.copy(DATA / "languages" / f"{lang}.flac", source / "languages")
    for name in ("speech.wav", "speech.m4a"):  # same stem: kept apart by their folders
        (source / "media" / name.split(".")[1]).mkdir(parents=True)
        shutil.copy(DATA / "media" / name, source / "media" / name.split(".")[1] / name)
    (source / "broken.wav").write_bytes(b"RIFF\x00\x00 this is not audio")
    good = 12
    common = ["--seed", "0", "-q"]

    plain = tmp_path / "plain"
    assert cli.main([str(source), "-o", str(plain), *common]) == 1  # the broken file fails, the others are written
    expected = _transcripts(plain)
    assert len(expected) == good

    out = tmp_path / "ray"
    # relative paths, as a user types them: Ray's workers run elsewhere
    command = [sys.executable, "-m", "crosswhisper.cli", source.name, "--ray", "-o", out.name, *common]
    env = {**os.environ, "RAY_ADDRESS": ""}  # a local cluster of its own, whatever the environment says
    # 1. killed (the whole process group, Ray's processes included) once two files are written
    job = subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while len(list(out.rglob("*.txt"))) < 2:
        assert job.poll() is None, job.stdout.read().decode()
        assert time.monotonic() < deadline, "no output within 300 s"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    # Ray's worker processes live in their own process groups: one may finish the file in hand
    # before Ray's reaper stops it; what counts as finished is what is there once writing stopped
    finished, stable_since = {}, time.monotonic()
    while time.monotonic() - stable_since < 5:
        now = {p: p.stat().st_mtime_ns for p in out.rglob("*.txt")}
        if now != finished:
            finished, stable_since = now, time.monotonic()
        time.sleep(0.2)
    assert 2 <= len(finished) < good, "the kill came too late to test resumption"

    # 2. the rerun does the rest only
    rerun = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 1, rerun.stderr  # 1: not every file has its transcripts
    # the broken file failed in the killed run (then left alone) or in this one
    assert f"{good - len(finished)} transcribed, {len(finished)} already done, " in rerun.stderr
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in finished.items())
    assert _transcripts(out) == expected
    failures = [json.loads(line) for line in (out / FAILURES_FILE).read_text().splitlines()]
    assert [f["file"] for f in failures] == [str((source / "broken.wav").resolve())]
    assert failures[0]["error"]

    # 3. a further rerun has nothing to do (no Ray cluster started), from Python this time
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    report = transcribe_files([source], output_dir=out, progress=False)
    assert (report.written, report.skipped, report.failed_before, report.failed) == ([], good, 1, [])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_ray_bulk_stops_clearly_when_the_model_cannot_load(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "crosswhisper.cli", str(TEST_CLEAN / "1221"), "--ray", "-q", "-o", str(out),
               "--model", str(tmp_path / "no-such-model")]
    run = subprocess.run(command, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "bulk transcription stopped: cannot load model" in run.stderr
    assert not (out / FAILURES_FILE).exists()  # not the files' fault

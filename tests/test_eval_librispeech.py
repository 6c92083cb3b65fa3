"""eval/librispeech.py: the evaluation script users and reviewers read figures from.

One real run on 2 test-clean utterances with tiny.en and the shipped adapter (every system,
one lossy setting, faster-whisper when installed), plus cheap checks of the data loaders.
"""

import json
from pathlib import Path

import pytest
import soundfile as sf

import crosswhisper
from crosswhisper import transcribe
from crosswhisper.metrics import word_error_rate
from crosswhisper.engine import default_gamma
from crosswhisper.whisper import DEFAULT_GAMMA, get_bundle
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SHIPPED_ADAPTER = Path(crosswhisper.__file__).resolve().parent / "adapters" / "tiny.en"

try:
    import faster_whisper  # noqa: F401

    HAVE_FASTER_WHISPER = True
except ImportError:
    HAVE_FASTER_WHISPER = False

SYSTEM_FIELDS = {
    "id", "name", "family", "settings", "wer", "wer_percent", "scored_utterances", "tokens_per_forward",
    "generated_tokens", "forward_calls", "mismatches", "mismatched_utterances", "encode_seconds",
    "decode_seconds", "e2e_seconds", "audio_seconds", "rtfx", "e2e_speedup_vs_reference",
    "decode_speedup_vs_reference",
}
UTTERANCE_SYSTEM_FIELDS = {
    "text", "tokens", "matches_reference", "e2e_seconds", "encode_seconds", "decode_seconds",
    "generated_tokens", "forward_calls",
}


@pytest.fixture(scope="module")
def script():
    return load_script(REPO / "eval" / "librispeech.py", "eval_librispeech")


@pytest.fixture(scope="module")
def shipped_adapter():
    if not (SHIPPED_ADAPTER / "adapter_config.json").is_file():
        pytest.fail(f"the shipped tiny.en adapter is missing: {SHIPPED_ADAPTER} (adapter_config.json); "
                    "eval/librispeech.py uses it by default")
    return SHIPPED_ADAPTER


@pytest.fixture(scope="module")
def full_run(script, shipped_adapter, test_clean, tmp_path_factory):
    out = tmp_path_factory.mktemp("librispeech-eval")
    argv = ["--model", "tiny.en", "--data", str(test_clean[0][1].parents[2]), "--max-utterances", "2",
            "--lossy", "0,-4", "--output-dir", str(out), "--no-progress"]
    if not HAVE_FASTER_WHISPER:
        argv.append("--no-faster-whisper")
    assert script.main(argv) == 0
    return out, json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_results_json_has_every_field(full_run, shipped_adapter, test_clean, capsys):
    out, report = full_run
    for key in ("platform", "processor", "cpu_count", "torch_threads", "device", "gpu"):
        assert key in report["machine"]
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch_threads"] >= 1
    for package in ("python", "torch", "transformers", "peft", "crosswhisper", "faster-whisper"):
        assert package in report["versions"]
    assert report["versions"]["torch"] and report["versions"]["crosswhisper"]
    assert report["model"] == "tiny.en"
    assert report["weights_sha256"] == get_bundle("tiny.en").weights_sha256 is not None
    assert Path(report["adapter"]) == shipped_adapter
    settings = report["settings"]
    assert settings["gamma"] == default_gamma(DEFAULT_GAMMA, "cpu")  # transcribe()'s default on this device
    assert settings["lossy"] == [[0.0, -4.0]]
    assert settings["utterances"] == 2 and settings["data"]["kind"] == "local"
    ids = [u for u, _, _ in test_clean[:2]]
    seconds = sum(sf.info(str(path)).duration for _, path, _ in test_clean[:2])
    assert settings["audio_seconds"] == pytest.approx(seconds, abs=1e-3)

    expected = ["generate", "own_loop", "lossless", "lossy_beta0_tau-4"]
    if HAVE_FASTER_WHISPER:
        expected += ["faster_whisper_float32", "faster_whisper_int8"]
    systems = {s["id"]: s for s in report["systems"]}
    assert [s["id"] for s in report["systems"]] == expected
    reference = systems["generate"]
    for s in report["systems"]:
        assert SYSTEM_FIELDS <= set(s), SYSTEM_FIELDS - set(s)
        assert s["wer"] >= 0 and s["wer_percent"] == pytest.approx(100 * s["wer"])  # > 1 is possible (insertions)
        assert s["scored_utterances"] == 2 and s["audio_seconds"] == pytest.approx(seconds, abs=1e-3)
        assert 0 <= s["mismatches"] <= 2 and len(s["mismatched_utterances"]) == s["mismatches"]
        assert s["e2e_seconds"] > 0
        assert s["rtfx"] == pytest.approx(s["audio_seconds"] / s["e2e_seconds"])
        assert s["e2e_speedup_vs_reference"] == pytest.approx(reference["e2e_seconds"] / s["e2e_seconds"])
        if s["family"] == "faster-whisper":
            assert s["tokens_per_forward"] == 1.0
            assert s["encode_seconds"] is None and s["decode_seconds"] is None
            assert s["decode_speedup_vs_reference"] is None
        else:
            assert s["encode_seconds"] > 0 and s["decode_seconds"] > 0
            assert s["encode_seconds"] + s["decode_seconds"] <= s["e2e_seconds"]
            assert s["tokens_per_forward"] == pytest.approx(s["generated_tokens"] / s["forward_calls"])
            assert s["decode_speedup_vs_reference"] == pytest.approx(
                reference["decode_seconds"] / s["decode_seconds"])
    assert reference["mismatches"] == 0 and reference["tokens_per_forward"] == 1.0
    assert reference["e2e_speedup_vs_reference"] == 1.0 and reference["decode_speedup_vs_reference"] == 1.0
    assert systems["lossless"]["mismatches"] == 0  # lossless: token-identical to the reference
    assert systems["lossless"]["wer"] == reference["wer"]
    assert systems["lossless"]["tokens_per_forward"] > 1.0  # the trained adapter drafts

    assert [u["id"] for u in report["utterances"]] == ids
    for utterance, (_, _, text) in zip(report["utterances"], test_clean):
        assert utterance["reference"] == text
        assert set(utterance["systems"]) == set(expected)
        for per_system in utterance["systems"].values():
            assert UTTERANCE_SYSTEM_FIELDS <= set(per_system)
            assert isinstance(per_system["text"], str) and all(isinstance(t, int) for t in per_system["tokens"])
        assert utterance["systems"]["generate"]["text"]
        assert utterance["systems"]["lossless"]["tokens"] == utterance["systems"]["generate"]["tokens"]


def test_markdown_and_plot(full_run):
    out, report = full_run
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| system | WER % | tokens/fwd | mismatches | enc s | dec s | e2e s | RTFx | e2e × ref | decode × ref |" in table
    for s in report["systems"]:
        assert f"| {s['name']} |" in table
    png = (out / "speed_vs_wer.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_reference_wer_equals_direct_transcribe(full_run, test_clean):
    _, report = full_run
    refs = [text for _, _, text in test_clean[:2]]
    hyps = [transcribe(path, adapter=None).text for _, path, _ in test_clean[:2]]
    reference = next(s for s in report["systems"] if s["id"] == "generate")
    assert reference["wer"] == word_error_rate(refs, hyps)
    assert [u["systems"]["generate"]["text"] for u in report["utterances"]] == hyps


def test_any_audio_format_and_unscored_audio(script, shipped_adapter, test_clean, tmp_path):
    """wav and flac side by side; audio without a transcript line is timed but not scored."""
    (utt_a, path_a, text_a), (utt_b, path_b, _) = test_clean[0], test_clean[1]
    speaker, chapter, _ = utt_a.split("-")
    chapter_dir = tmp_path / "subset" / speaker / chapter
    chapter_dir.mkdir(parents=True)
    # the first seconds only: this test is about data handling, not about speed
    audio, rate = sf.read(str(path_a), dtype="float32")
    sf.write(chapter_dir / f"{utt_a}.wav", audio[: 4 * rate], rate)
    audio, rate = sf.read(str(path_b), dtype="float32")
    sf.write(chapter_dir / f"{utt_b}.flac", audio[: 3 * rate], rate)
    # a transcript for utt_a only, and a line whose audio does not exist
    (chapter_dir / f"{speaker}-{chapter}.trans.txt").write_text(f"{utt_a} {text_a}\n{speaker}-{chapter}-9999 GONE\n")

    items = script.find_librispeech(tmp_path / "subset")
    assert [(u, p.suffix, t) for u, p, t in items] == [(utt_a, ".wav", text_a), (utt_b, ".flac", None)]

    out = tmp_path / "out"
    argv = ["--data", str(tmp_path / "subset"), "--adapter", "none", "--no-faster-whisper",
            "--output-dir", str(out), "--no-progress"]
    assert script.main(argv) == 0
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert report["settings"]["utterances"] == 2 and report["settings"]["scored_utterances"] == 1
    assert [s["id"] for s in report["systems"]] == ["generate", "own_loop"]
    assert report["adapter"] is None
    assert report["utterances"][1]["reference"] is None
    assert report["utterances"][1]["systems"]["generate"]["text"]  # timed and transcribed
    hyp = report["utterances"][0]["systems"]["generate"]["text"]
    assert report["systems"][0]["wer"] == word_error_rate([text_a], [hyp])


def test_hf_dataset_loader(script, test_clean, tmp_path):
    """--hf-dataset: a local parquet dataset in LibriSpeech's HF schema (the hub is unreachable in CI)."""
    datasets = pytest.importorskip("datasets")
    rows = test_clean[:2]
    dataset = datasets.Dataset.from_dict({
        "id": [u for u, _, _ in rows],
        "speaker_id": [int(u.split("-")[0]) for u, _, _ in rows],
        "text": [t for _, _, t in rows],
        "audio": [str(p) for _, p, _ in rows],
    }).cast_column("audio", datasets.Audio(sampling_rate=16000))
    (tmp_path / "data").mkdir()
    dataset.to_parquet(str(tmp_path / "data" / "test-00000-of-00001.parquet"))
    utterances = script.load_hf(str(tmp_path), None, "test", speakers=[rows[0][0].split("-")[0]], max_utterances=1)
    assert len(utterances) == 1
    assert utterances[0].id == rows[0][0] and utterances[0].reference == rows[0][2]
    expected, _ = sf.read(str(rows[0][1]), dtype="float32")
    assert utterances[0].audio.shape == expected.shape


def test_clear_errors(script, tmp_path, caplog):
    assert script.main(["--data", str(tmp_path / "nowhere"), "--adapter", "none"]) == 2
    assert "LibriSpeech directory not found" in caplog.text
    assert script.main(["--adapter", str(tmp_path), "--max-utterances", "1"]) == 2
    assert "not a peft adapter" in caplog.text
    with pytest.raises(SystemExit):
        script.main(["--gamma", "0"])
    with pytest.raises(script.EvalError):
        script.parse_lossy(["0.5"])

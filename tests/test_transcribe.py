"""The baseline: transcribe() and the CLI on real LibriSpeech audio with real Whisper weights."""

import dataclasses
import json
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import crosswhisper
from crosswhisper import AudioError, transcribe
from crosswhisper.cli import main as cli_main
from crosswhisper.metrics import word_error_rate


@pytest.mark.parametrize("model,max_wer", [("tiny.en", 0.10), ("base", 0.08)])
def test_wer_on_test_clean(model, max_wer, test_clean):
    hyps = [transcribe(path, model=model, adapter=None).text for _, path, _ in test_clean]
    refs = [text for _, _, text in test_clean]
    wer = word_error_rate(refs, hyps)
    print(f"{model}: WER {wer:.2%}")
    assert wer <= max_wer


def test_result_fields(test_clean):
    _, path, _ = test_clean[0]
    result = transcribe(path)
    assert isinstance(result, crosswhisper.Transcription)
    assert result.text and result.language == "en"
    assert result.tokens and all(isinstance(t, int) for t in result.tokens)
    s = result.stats
    assert s.forward_calls >= 1 and s.generated_tokens == len(result.tokens) + 1  # + end-of-text
    assert s.tokens_per_forward == pytest.approx(s.generated_tokens / s.forward_calls)
    assert s.encode_seconds > 0 and s.decode_seconds > 0
    first, last = result.segments[0], result.segments[-1]
    assert first.start == 0 and 0 < last.end <= result.duration + 0.02  # real timestamps
    assert first.temperature == 0 and first.avg_logprob < 0 and 0 <= first.no_speech_prob < 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.text = "changed"  # frozen


def test_array_input_equals_file_input(test_clean, test_clean_audio):
    utt, path, _ = test_clean[1]
    assert transcribe(test_clean_audio[utt]).tokens == transcribe(path).tokens


@pytest.mark.parametrize("lang", ["en", "de", "es", "it"])
def test_base_detects_the_language(lang, test_clean, language_clips):
    # English: a LibriSpeech utterance; the others: espeak-ng sentences (tests/data/languages)
    path = test_clean[2][1] if lang == "en" else language_clips[lang]
    assert transcribe(path, model="base").language == lang


def test_other_formats_and_rates(tmp_path, test_clean, test_clean_audio):
    utt, path, _ = test_clean[0]
    reference = transcribe(path).text
    ogg = tmp_path / "speech.ogg"  # Ogg Vorbis at 44.1 kHz stereo: resampled and downmixed
    import librosa

    stereo = librosa.resample(test_clean_audio[utt], orig_sr=16000, target_sr=44100)
    sf.write(ogg, np.stack([stereo, stereo], axis=1), 44100, format="OGG", subtype="VORBIS")
    assert transcribe(ogg).text.split()[:5] == reference.split()[:5]


def test_silence_gives_empty_text():
    result = transcribe(np.zeros(16000 * 3, dtype=np.float32))
    assert result.text == "" and result.tokens == ()


def test_long_audio_is_transcribed_segment_by_segment(test_clean_audio, test_clean):
    """49.4 s: Whisper's long-form algorithm cuts segments at timestamps, not at 30 s."""
    audio = np.concatenate([test_clean_audio[u] for u, _, _ in test_clean])
    streamed = []
    result = transcribe(audio, on_segment=streamed.append)
    assert tuple(streamed) == result.segments  # each one told as soon as its window was decoded
    assert result.windows >= 2 and len(result.segments) >= 7
    starts = [segment.start for segment in result.segments]
    assert starts == sorted(starts) and all(s.start <= s.end for s in result.segments)
    assert result.segments[-1].end <= result.duration + 0.02
    assert word_error_rate([" ".join(text for _, _, text in test_clean)], [result.text]) < 0.1
    reference = transcribe(audio, adapter=None)  # transformers' generate in every window
    assert result.tokens == reference.tokens
    assert [(s.start, s.end) for s in result.segments] == [(s.start, s.end) for s in reference.segments]


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        transcribe(tmp_path / "nope.wav")
    text_file = tmp_path / "notes.wav"
    text_file.write_text("this is not audio")
    with pytest.raises(AudioError, match="notes.wav"):
        transcribe(text_file)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="empty"):
        transcribe(empty)
    with pytest.raises(TypeError):
        transcribe(12345)
    with pytest.raises(ValueError, match="English-only"):
        transcribe(np.zeros(1600, dtype=np.float32), language="de")
    with pytest.raises(TypeError):
        transcribe("x.wav", "tiny.en")  # options are keyword-only


def test_cli_writes_all_formats_and_survives_a_bad_file(tmp_path, test_clean, capsys):
    _, good, _ = test_clean[0]
    bad = tmp_path / "broken.flac"
    bad.write_bytes(b"\x00" * 100)
    out = tmp_path / "out"
    status = cli_main([str(good), str(bad), str(tmp_path / "missing.wav"), "-f", "all", "-o", str(out), "--word-timestamps"])
    assert status != 0
    err = capsys.readouterr().err
    assert "broken.flac" in err and "missing.wav" in err
    stem = good.stem
    assert (out / f"{stem}.txt").read_text().strip()
    assert (out / f"{stem}.srt").read_text().startswith("1\n00:00:00,000 --> ")
    assert (out / f"{stem}.vtt").read_text().startswith("WEBVTT")
    written = json.loads((out / f"{stem}.json").read_text())
    assert written["language"] == "en"
    words = [w for segment in written["segments"] for w in segment["words"]]  # --word-timestamps
    assert words and all(w["start"] <= w["end"] for w in words)
    assert "".join(w["word"] for w in words).strip() == written["text"]
    assert not list(out.glob("broken.*"))


def test_cli_console_script(tmp_path, test_clean):
    _, good, _ = test_clean[3]
    script = Path(sys.executable).parent / "crosswhisper-transcribe"  # the installed entry point
    assert script.exists(), "pip install the package: the console script is missing"
    proc = subprocess.run([str(script), str(good), "-o", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / f"{good.stem}.txt").read_text().strip()


def test_cli_unknown_model(tmp_path, test_clean):
    assert cli_main([str(test_clean[0][1]), "--model", str(tmp_path / "no-such-model")]) == 2


@pytest.mark.parametrize("model,compute_type", [
    ("tiny.en", "bfloat16"), ("tiny.en", "int8"),
    pytest.param("base", "bfloat16", marks=pytest.mark.slow), pytest.param("base", "int8", marks=pytest.mark.slow),
])
def test_low_precision_compute_types_draft_losslessly(model, compute_type, test_clean, longform):
    """compute_type="bfloat16" / "int8" (encoder and vocabulary projection in that type):
    drafting is token-identical to our greedy loop (gamma=0) at the same compute type, on the
    test-clean clips and a 40 s long-form excerpt; the transcripts stay about as good as
    float32's."""
    from crosswhisper.audio import load_audio
    from crosswhisper.whisper.loading import run_encoder, with_compute_type
    from crosswhisper.whisper.transcribe import get_bundle

    bundle = get_bundle(model)
    low = with_compute_type(bundle, compute_type)
    assert with_compute_type(bundle, compute_type) is low and with_compute_type(low, "float32") is bundle
    features = torch.randn(1, bundle.model.config.num_mel_bins, 3000)
    float_states, low_states = run_encoder(bundle, features), run_encoder(low, features)
    from crosswhisper.quantized import use_fbgemm

    if compute_type == "int8" and use_fbgemm():  # below AVX-512 int8 is the vocabulary projection's alone
        assert torch.equal(low_states, float_states)
    else:
        assert not torch.equal(low_states, float_states)  # the low-precision encoder runs
    assert torch.nn.functional.cosine_similarity(low_states.flatten(), float_states.flatten(), dim=0) > 0.98

    audio, _ = longform
    inputs = [path for _, path, _ in test_clean] + [load_audio(audio)[: 40 * 16000]]
    hypotheses = {}
    for ct in ("float32", compute_type):
        for gamma in (0, None):
            hypotheses[ct, gamma] = [transcribe(x, model=bundle, compute_type=ct, gamma=gamma) for x in inputs]
        drafted, greedy = hypotheses[ct, None], hypotheses[ct, 0]
        assert [[s.tokens for s in r.segments] for r in drafted] == [[s.tokens for s in r.segments] for r in greedy], ct
        assert sum(r.stats.tokens_per_forward for r in drafted) / len(drafted) > 1.4
    references = [text for _, _, text in test_clean]
    errors = {ct: word_error_rate(references, [r.text for r in hypotheses[ct, 0][:7]]) for ct in ("float32", compute_type)}
    assert errors[compute_type] <= errors["float32"] + 0.02, errors
    with pytest.raises(ValueError, match="compute_type"):
        transcribe(inputs[0], model=bundle, compute_type="int3")


@pytest.mark.parametrize("kernel", ["fbgemm", "_int_mm"])
def test_int8_product_is_row_exact_and_close_to_float(kernel, monkeypatch):
    """quantized.Int8Linear, on each of its kernels that this CPU runs: each row's output is the
    same whatever rows share the call (what lossless drafting and batching need), and close to
    the float product."""
    from crosswhisper import quantized
    from crosswhisper.quantized import Int8Linear, quantize_linears

    if kernel == "fbgemm" and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch has no fbgemm")
    monkeypatch.setattr(quantized, "use_fbgemm", lambda: kernel == "fbgemm")
    torch.manual_seed(0)
    linear = torch.nn.Linear(384, 1536)
    int8 = Int8Linear(linear.weight, linear.bias)
    assert (int8.fbgemm is not None) == (kernel == "fbgemm")
    x = torch.randn(2, 11, 384)
    x[1, 4, 7] = 12.0  # an outlier in one row must not move the others' quantisation
    together = int8(x)
    alone = torch.stack([torch.cat([int8(x[b, t : t + 1]) for t in range(11)]) for b in range(2)])
    assert torch.equal(together, alone)
    with torch.no_grad():
        exact = linear(x)
    assert (together - exact).norm() / exact.norm() < 0.02
    zeros = int8(torch.zeros(3, 384))  # an all-zero row: no division by zero
    assert torch.allclose(zeros, linear.bias.detach().expand(3, -1), atol=1e-6)
    stack = quantize_linears(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.Linear(8, 4))))
    assert isinstance(stack[0], Int8Linear) and isinstance(stack[1][0], Int8Linear)


def test_int8_on_a_cpu_without_fast_int8_products_warns(monkeypatch, caplog):
    """int8 is asked for speed; on an x86 CPU below AVX-512 (no VNNI/AMX) whose torch has no
    fbgemm it runs slower than float32, and the user is told so when the int8 variant is made;
    with fbgemm (AVX2 kernels) it is fast there."""
    import logging

    from crosswhisper import quantized
    from crosswhisper.whisper import loading

    monkeypatch.setattr(quantized.platform, "machine", lambda: "x86_64")
    for capability, built, slow, fbgemm in (("AVX2", False, True, False), ("AVX2", True, False, True), ("AVX512", True, False, False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(quantized, "_has_fbgemm", lambda b=built: b)
        assert (quantized.int8_is_slow(), quantized.use_fbgemm()) == (slow, fbgemm), capability
    monkeypatch.undo()
    monkeypatch.setattr(loading, "int8_is_slow", lambda: True)
    bundle = crosswhisper.whisper.get_bundle("tiny.en")
    monkeypatch.setattr(loading, "_VARIANTS", weakref.WeakKeyDictionary())  # the variant made afresh
    with caplog.at_level(logging.WARNING, logger=loading.__name__):
        assert loading.with_compute_type(bundle, "int8").compute_type == "int8"
    assert "slower than float32" in caplog.text

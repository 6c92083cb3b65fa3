"""Timestamp mode (DESIGN §1.5): Whisper's timestamp rules applied per block position from the
drafted prefix keep lossless drafting token-identical to transformers' `generate` with
`return_timestamps=True`, on real weights and real audio."""

import pytest
import torch

from crosswhisper.decoding import DecodeOptions
from crosswhisper.lora import load_adapter, new_adapter, save_adapter, shipped_adapter
from crosswhisper.whisper import decode_window, decoder_prompt, encode, generate_greedy, get_bundle, logits_processor


# base: ~60 s in all, slow (tiny.en exercises the same timestamp rules in the quick run)
@pytest.fixture(scope="module", params=["tiny.en", pytest.param("base", marks=pytest.mark.slow)])
def windows(request, test_clean, test_clean_audio):
    """A model, its encoder states and timestamp-mode prompt per test-clean utterance, and the
    reference: transformers' generate with timestamps."""
    bundle = get_bundle(request.param)
    cases = []
    for utt, _, _ in test_clean:
        hidden = encode(bundle, test_clean_audio[utt])
        prompt = decoder_prompt(bundle, "en", timestamps=True)
        reference, _ = generate_greedy(bundle, hidden, prompt, timestamps=True)
        cases.append((hidden, prompt, reference))
    return bundle, cases


def test_reference_really_has_timestamps(windows):
    bundle, cases = windows
    timestamp_begin = bundle.generation_config.no_timestamps_token_id + 1
    for _, _, reference in cases:
        assert reference[0] >= timestamp_begin and reference[-2] >= timestamp_begin  # <|0.00|> … <|t|><|eot|>


@pytest.mark.parametrize("adapter", ["none", "shipped", "random"])
def test_timestamp_mode_lossless_is_token_identical_to_generate(windows, adapter, tmp_path):
    bundle, cases = windows
    if adapter == "shipped":
        adapted = load_adapter(bundle, shipped_adapter(bundle.name))
    elif adapter == "random":  # the worst drafter: every rule is exercised at every position
        save_adapter(new_adapter(bundle, rank=8, random_init=True, seed=0), tmp_path, bundle)
        adapted = load_adapter(bundle, tmp_path)
    else:
        adapted = None
    tokens = calls = 0
    for gamma in (3,) if adapter == "none" else (1, 3, 4):
        for hidden, prompt, reference in cases:
            result = decode_window(bundle, hidden, prompt, adapted=adapted, options=DecodeOptions(gamma=gamma))
            assert result.tokens == reference
            tokens, calls = tokens + len(result.tokens), calls + result.forward_calls
    if adapter == "shipped":
        assert tokens / calls > 1.4


def test_token_logprobs_and_no_speech_probability(windows):
    bundle, cases = windows
    hidden, prompt, reference = cases[0]
    result = decode_window(bundle, hidden, prompt, adapted=None, options=DecodeOptions(gamma=0, token_logprobs=True))
    assert len(result.token_logprobs) == len(result.tokens) and all(lp <= 0 for lp in result.token_logprobs)
    assert -1.0 < sum(result.token_logprobs) / len(result.token_logprobs) < 0  # clear speech: likely tokens
    assert 0 <= result.no_speech_prob < 0.2
    silence = encode(bundle, torch.zeros(16000).numpy())
    quiet = decode_window(bundle, silence, prompt, adapted=None, options=DecodeOptions(gamma=0))
    assert quiet.no_speech_prob > result.no_speech_prob


def test_timestamp_rules_per_position():
    bundle = get_bundle("tiny.en")
    config = bundle.generation_config
    ts = config.no_timestamps_token_id + 1
    prompt = decoder_prompt(bundle, "en", timestamps=True)
    process = logits_processor(bundle, len(prompt), timestamps=True)
    V = bundle.model.config.vocab_size
    text = 1000
    # one block, four positions: after the prompt, after <|0.00|>, after <|0.00|> text, after text <|1.00|>
    tokens = torch.tensor(prompt + [ts, text, ts + 50])
    index = torch.arange(len(prompt), len(prompt) + 4)
    logits = process(torch.zeros(1, 4, V), index, tokens)
    allowed = ~torch.isinf(logits[0])
    assert not allowed[0, :ts].any() and allowed[0, ts : ts + 51].all() and not allowed[0, ts + 51 :].any()
    assert not allowed[1, ts:].any()  # a pair just opened at the start: text next
    assert allowed[2, ts + 1 :].any() and not allowed[2, : ts + 1][ts]  # monotonic: not <|0.00|> again
    assert not allowed[3, :50256].any() and allowed[3, ts + 50]  # a segment closed: its pair's end
    assert not allowed[:, config.no_timestamps_token_id].any()

"""Whisper's sequential long-form algorithm (crosswhisper.whisper.longform): its rules on scripted
decodes, and token identity with transformers' long-form `generate` on real audio."""

import difflib
import time

import numpy as np
import pytest
import torch

from crosswhisper.audio import load_audio
from crosswhisper.metrics import word_error_rate
from crosswhisper.whisper import get_bundle
from crosswhisper.whisper import longform as lf
from crosswhisper.whisper.longform import (
    LongFormOptions,
    SpecialTokens,
    WindowTokens,
    average_logprob,
    compression_ratio,
    decode_with_fallback,
    previous_tokens,
    split_segments,
    token_compression_ratio,
)

TB = 50363  # <|0.00|> of tiny.en, for the scripted cases only
IDS = SpecialTokens(
    eot=50256, sot_prev=50360, no_timestamps=50362, timestamp_begin=TB, no_speech=50361, vocab_size=51864, max_positions=448
)


def ts(seconds: float) -> int:
    return TB + round(seconds / 0.02)


# --- segments ---------------------------------------------------------------------------------


def test_segments_at_timestamp_pairs_then_seek_to_the_last_pair():
    tokens = [ts(0), 10, 11, ts(2), ts(2), 12, ts(4.5), ts(4.5), 13, 14]  # ends in an open segment
    segments, advance = split_segments(tokens, seek=1000, seek_num_frames=3000, timestamp_begin=TB)
    assert [(s.start, s.end, s.tokens) for s in segments] == [
        (10.0, 12.0, (ts(0), 10, 11, ts(2))),
        (12.0, 14.5, (ts(2), 12, ts(4.5), ts(4.5))),  # both timestamps of the closing pair kept
    ]
    assert advance == 450  # the open segment is dropped: the next window starts at 4.5 s


def test_single_timestamp_ending_closes_the_window():
    tokens = [ts(0), 10, ts(2), ts(2), 12, ts(3)]
    segments, advance = split_segments(tokens, seek=0, seek_num_frames=2500, timestamp_begin=TB)
    assert [(s.start, s.end, s.tokens) for s in segments] == [(0.0, 2.0, (ts(0), 10, ts(2))), (2.0, 3.0, (ts(2), 12, ts(3)))]
    assert advance == 2500


def test_no_pair_is_one_segment_to_the_last_timestamp_or_the_window_end():
    segments, advance = split_segments([ts(0), 10, 11, ts(7)], seek=3000, seek_num_frames=1234, timestamp_begin=TB)
    assert [(s.start, s.end) for s in segments] == [(30.0, 37.0)] and advance == 1234
    segments, advance = split_segments([ts(0), 10, 11], seek=3000, seek_num_frames=1234, timestamp_begin=TB)
    assert [(s.start, s.end) for s in segments] == [(30.0, 30.0 + 617 * 0.02)] and advance == 1234
    segments, advance = split_segments([10, 11], seek=0, seek_num_frames=3000, timestamp_begin=TB)  # without timestamps
    assert [(s.start, s.end, s.tokens) for s in segments] == [(0.0, 30.0, (10, 11))] and advance == 3000


# --- prompt ----------------------------------------------------------------------------------


def test_previous_tokens_drop_a_closing_pair_and_keep_half_the_context():
    context = [(ts(0), 10, ts(2)), (ts(2), 11, ts(3), ts(3))]
    assert previous_tokens(context, IDS) == [IDS.sot_prev, ts(0), 10, ts(2), ts(2), 11, ts(3)]
    long = [tuple(range(300))]
    assert previous_tokens(long, IDS) == [IDS.sot_prev] + list(range(300 - 223, 300))


# --- the fallback rules ------------------------------------------------------------------------


def test_ratios_and_average():
    assert compression_ratio("the " * 100) > 2.4 > compression_ratio("Kara lay back on his down pillows.")
    repetitive = [ts(0)] + [10, 11] * 60 + [IDS.eot]
    assert token_compression_ratio(repetitive, IDS.vocab_size) > 2.4
    assert token_compression_ratio([ts(0), 10, 11, 12, ts(1), IDS.eot], IDS.vocab_size) < 2.4
    assert average_logprob([-0.5, -1.5, -1.0]) == pytest.approx(-1.0)  # end-of-text counted


def scripted(*decodes):
    """A window decoder returning the given (tokens, logprob per token, no-speech p) in turn."""
    calls = []

    def decode(hidden, prompt, temperature):
        tokens, logprob, no_speech = decodes[len(calls)]
        calls.append((list(prompt), temperature))
        return WindowTokens(list(tokens), [logprob] * len(tokens), no_speech, len(tokens), {1: len(tokens)})

    decode.calls = calls
    return decode


GOOD = ([ts(0), 10, 11, 12, ts(1), IDS.eot], -0.2, 0.01)
UNLIKELY = ([ts(0), 10, 13, 12, ts(1), IDS.eot], -1.5, 0.01)
REPEATED = ([ts(0)] + [10, 11] * 60 + [IDS.eot], -0.1, 0.01)
SILENT = ([ts(0), 10, ts(1), IDS.eot], -1.5, 0.9)


def test_fallback_goes_hotter_until_a_decode_passes():
    decode = scripted(REPEATED, UNLIKELY, GOOD)
    decision = decode_with_fallback(decode, None, [1], LongFormOptions(), IDS)
    assert [t for _, t in decode.calls] == [0.0, 0.2, 0.4]
    assert decision.temperature == 0.4 and decision.decoded.tokens == GOOD[0] and not decision.skip
    assert len(decision.attempts) == 3


def test_the_last_temperature_is_kept_whatever_it_gives():
    decode = scripted(UNLIKELY, UNLIKELY)
    decision = decode_with_fallback(decode, None, [1], LongFormOptions(temperature=(0.0, 0.5)), IDS)
    assert decision.temperature == 0.5 and decision.avg_logprob == pytest.approx(-1.5) and not decision.skip


def test_silence_is_skipped_without_fallback():
    decode = scripted(SILENT)
    decision = decode_with_fallback(decode, None, [1], LongFormOptions(), IDS)
    assert decision.skip and len(decode.calls) == 1
    # a likely decode is speech, however probable <|nospeech|> is
    decode = scripted(([ts(0), 10, ts(1), IDS.eot], -0.1, 0.9))
    assert not decode_with_fallback(decode, None, [1], LongFormOptions(), IDS).skip


# --- the loop, on the real model with scripted decodes ----------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return get_bundle("tiny.en")


def test_loop_conditions_on_previous_text_and_resets_after_a_hot_window(tiny):
    ids = SpecialTokens.of(tiny)
    sot = tiny.generation_config.decoder_start_token_id
    first = [ts(0), 100, 101, ts(5), ts(5), 102, ts(8), ts(8), 103, ids.eot]  # open last segment: seek → 8 s
    decodes = [
        (first, -0.2, 0.0),  # window 1 at 0 s
        UNLIKELY, UNLIKELY, GOOD,  # window 2 at 8 s: kept at T = 0.4
        UNLIKELY, UNLIKELY, UNLIKELY, GOOD,  # window 3 at 38 s: kept at T = 0.6
        GOOD,  # window 4 at 68 s: after a hot window, no previous text
        GOOD,  # window 5 at 98 s (2 s of frames left): conditioned again
    ]
    decode = scripted(*decodes)
    features = torch.zeros(1, tiny.feature_extractor.feature_size, 10000)
    result = lf.transcribe_features(tiny, features, LongFormOptions(), decode)
    prompts = [p for p, _ in decode.calls]
    assert len(prompts) == len(decodes)
    assert prompts[0] == [sot]
    # the second pair's closing timestamp is left out of the context
    assert prompts[1] == [ids.sot_prev, ts(0), 100, 101, ts(5), ts(5), 102, ts(8), sot]
    assert prompts[4][0] == ids.sot_prev and prompts[8] == [sot] and prompts[9][0] == ids.sot_prev
    assert [s.temperature for s in result.segments] == [0.0, 0.0, 0.4, 0.6, 0.0, 0.0]
    assert [s.start for s in result.segments] == [0.0, 5.0, 8.0, 38.0, 68.0, 98.0]
    assert [s.text for s in result.segments][-1] == tiny.tokenizer.decode([10, 11, 12]).strip()
    assert result.windows == 5 and result.skipped == 0 and result.stats.generated_tokens == sum(len(d[0]) for d in decodes)
    assert result.stats.forward_calls == result.stats.generated_tokens


def test_initial_prompt_goes_before_the_first_window_only(tiny):
    sot = tiny.generation_config.decoder_start_token_id
    features = torch.zeros(1, tiny.feature_extractor.feature_size, 6000)
    options = LongFormOptions(initial_prompt="Kara.", condition_on_previous_text=False)
    decode = scripted(GOOD, GOOD)
    lf.transcribe_features(tiny, features, options, decode)
    prompt_ids = lf.prompt_text_tokens(tiny, "Kara.")
    assert decode.calls[0][0] == [tiny.generation_config.prev_sot_token_id] + prompt_ids + [sot]
    assert decode.calls[1][0] == [sot]  # openai-whisper; transformers would repeat the prompt here


# --- exactness against transformers' long-form generate -------------------------------------


@pytest.fixture(scope="module")
def longform_audio(longform):
    path, reference = longform
    return load_audio(path), reference


def transformers_long_form(bundle, audio, options: LongFormOptions):
    """transformers' sequential long-form generate over the whole file, greedy at T = 0."""
    features = bundle.feature_extractor(
        audio, sampling_rate=16000, truncation=False, padding="longest", return_attention_mask=True, return_tensors="pt"
    )
    with torch.inference_mode():
        out = bundle.model.generate(
            features.input_features, attention_mask=features.attention_mask, return_timestamps=True,
            return_segments=True, condition_on_prev_tokens=options.condition_on_previous_text,
            temperature=options.temperature, compression_ratio_threshold=options.compression_ratio_threshold,
            logprob_threshold=options.logprob_threshold, no_speech_threshold=options.no_speech_threshold,
        )
    segments = [(float(s["start"]), float(s["end"]), tuple(s["tokens"].tolist())) for s in out["segments"][0]]
    return out["sequences"][0].tolist(), segments


def mismatches(a, b) -> int:
    return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))


@pytest.mark.parametrize("condition", [True, False], ids=["condition", "no-condition"])
def test_token_identical_to_transformers_long_form(tiny, longform_audio, condition):
    audio, reference = longform_audio
    options = LongFormOptions(temperature=(0.0,), condition_on_previous_text=condition)  # no fallback
    t0 = time.perf_counter()
    expected_tokens, expected_segments = transformers_long_form(tiny, audio, options)
    t1 = time.perf_counter()
    result = lf.transcribe_long_form(audio, tiny, options)
    t2 = time.perf_counter()
    wer = word_error_rate([reference], [result.text])
    print(
        f"condition={condition}: {len(expected_tokens)} tokens, {mismatches(result.tokens, expected_tokens)} mismatches, "
        f"{len(result.segments)} segments, {result.windows} windows, WER {wer:.2%}; "
        f"transformers {t1 - t0:.1f} s, ours {t2 - t1:.1f} s"
    )
    assert mismatches(result.tokens, expected_tokens) == 0
    assert [(s.start, s.end, s.tokens) for s in result.segments] == expected_segments  # times exactly equal too
    assert wer <= 0.06
    assert result.language == "en" and result.windows >= 4
    assert result.segments[-1].end <= result.duration + 0.02


def test_fallback_and_skips_identical_to_transformers(tiny, longform_audio):
    """Thresholds that make windows fall back (sampling, seeded alike: the window after a hot one
    is not conditioned) and one be skipped as silence; decisions, tokens and segments must all be
    transformers'. The first 60 s: three windows."""
    audio = longform_audio[0][: 60 * 16000]
    options = LongFormOptions(temperature=(0.0, 0.6), logprob_threshold=-0.2, no_speech_threshold=0.3)
    torch.manual_seed(0)
    expected_tokens, expected_segments = transformers_long_form(tiny, audio, options)
    torch.manual_seed(0)
    result = lf.transcribe_long_form(audio, tiny, options)
    temperatures = [s.temperature for s in result.segments]
    print(f"temperatures {temperatures}, {result.windows} windows, {result.skipped} skipped")
    assert 0.6 in temperatures and 0.0 in temperatures and result.skipped >= 1
    assert mismatches(result.tokens, expected_tokens) == 0
    assert [(s.start, s.end, s.tokens) for s in result.segments] == expected_segments


def test_multilingual_language_detection_identical_to_transformers(language_clips):
    """A multilingual model: the language detected on the first window, <|lang|> <|transcribe|>
    in the prompt, the no-speech probability from the <|startoftranscript|> position."""
    base = get_bundle("base")
    audio = load_audio(language_clips["de"])
    features = base.feature_extractor(audio, sampling_rate=16000, return_attention_mask=True, return_tensors="pt")
    with torch.inference_mode():
        out = base.model.generate(
            features.input_features, return_timestamps=True, return_segments=True, condition_on_prev_tokens=True,
            temperature=(0.0,), compression_ratio_threshold=2.4, logprob_threshold=-1.0, no_speech_threshold=0.6,
        )
    result = lf.transcribe_long_form(audio, base, LongFormOptions(temperature=(0.0,)))
    assert result.language == "de"
    assert list(result.tokens) == out["sequences"][0].tolist()


def _words(text: str) -> list[str]:
    return [w for w in "".join(c.lower() if c.isalnum() or c.isspace() else " " for c in text).split()]


def test_word_timestamps_agree_with_faster_whisper(longform_audio):
    """word_timestamps=True: every segment's words spell its text, in time order inside it, and
    their start times are faster-whisper's (the same alignment-head DTW rules) on the same
    CTranslate2 weights, to a few hundredths of a second. The first 60 s: two windows."""
    from faster_whisper import WhisperModel

    from crosswhisper import transcribe
    from crosswhisper.whisper import bundled_model_dir

    audio = longform_audio[0][: 60 * 16000]
    result = transcribe(audio, model="tiny.en", word_timestamps=True, temperature=0.0)
    words = [w for s in result.segments for w in s.words]
    for segment in result.segments:
        assert "".join(w.word for w in segment.words).strip() == segment.text
        assert all(a.start <= a.end <= b.start + 1e-6 for a, b in zip(segment.words, segment.words[1:]))
        assert segment.start <= segment.words[0].start and segment.words[-1].end <= segment.end
        assert all(0.0 < w.probability <= 1.0 for w in segment.words)
    model = WhisperModel(str(bundled_model_dir("tiny.en")), device="cpu", compute_type="float32", cpu_threads=2)
    theirs = [w for s in model.transcribe(audio, beam_size=1, temperature=0.0, word_timestamps=True, language="en")[0]
              for w in s.words]
    ours_text, their_text = [_words(w.word) for w in words], [_words(w.word) for w in theirs]
    matcher = difflib.SequenceMatcher(a=[" ".join(t) for t in ours_text], b=[" ".join(t) for t in their_text], autojunk=False)
    gaps = [abs(words[i + k].start - theirs[j + k].start) for i, j, n in matcher.get_matching_blocks() for k in range(n)]
    print(f"{len(words)} words, {len(gaps)} matched; start differences: median {np.median(gaps):.3f} s, "
          f"90th percentile {np.percentile(gaps, 90):.3f} s, max {max(gaps):.3f} s")
    assert len(gaps) >= 0.9 * len(words)
    assert np.median(gaps) <= 0.02 and np.percentile(gaps, 90) <= 0.1


def test_beam_search_is_transformers_beam_search(test_clean, test_clean_audio):
    """beam_size=5 decodes each window with transformers' beam search (not drafted): token for
    token what `generate(num_beams=5)` gives, and not greedy's where the two differ."""
    from crosswhisper import transcribe

    bundle = get_bundle("tiny.en")
    timestamp_begin = bundle.generation_config.no_timestamps_token_id + 1
    eot = bundle.generation_config.eos_token_id
    differs = 0
    for utt, _, _ in test_clean:
        audio = test_clean_audio[utt]
        features = bundle.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
        with torch.inference_mode():
            sequences = {beams: bundle.model.generate(features, num_beams=beams, return_timestamps=True)[0].tolist()
                         for beams in (1, 5)}
        expected = {beams: [t for t in seq if t < eot or t >= timestamp_begin] for beams, seq in sequences.items()}
        result = transcribe(audio, model=bundle, beam_size=5, temperature=0.0)
        assert list(result.tokens) == expected[5], utt
        differs += expected[5] != expected[1]
    assert differs >= 1, "no utterance where beam search and greedy differ: the test cannot tell them apart"


def test_no_invented_text_on_noise_clicks_or_truncated_files(test_clean, tmp_path):
    """Where there is nothing to transcribe the transcript is empty, as faster-whisper gives it on
    the same weights: 20 s of white noise (the no-speech rule), a 50 ms click of noise and a
    WAV file cut off after its first 62 ms (windows under 0.1 s are not decoded)."""
    import soundfile as sf

    from crosswhisper import transcribe

    rng = np.random.default_rng(0)
    speech, rate = sf.read(test_clean[0][1], dtype="float32")
    truncated = tmp_path / "truncated.wav"
    sf.write(truncated, speech[: 5 * rate], rate, subtype="PCM_16")
    truncated.write_bytes(truncated.read_bytes()[: 44 + 2000])  # the header promises 5 s, 1000 samples follow
    cases = {
        "white noise, 20 s": (0.1 * rng.standard_normal(20 * 16000)).astype(np.float32),
        "noise click, 50 ms": (0.1 * rng.standard_normal(800)).astype(np.float32),
        "truncated WAV": truncated,
    }
    for name, audio in cases.items():
        result = transcribe(audio, model="tiny.en")
        assert result.text == "" and result.segments == (), f"{name}: {result.text!r}"
        assert result.skipped >= 1


def test_streamed_features_are_the_whole_audio_features(tiny, longform_audio):
    """Long audio's log-mel is computed a window at a time (bounded memory): bit for bit the
    frames transformers' feature extractor computes over the whole audio, at any seek."""
    audio = longform_audio[0]
    whole = tiny.feature_extractor(
        audio, sampling_rate=16000, truncation=False, padding="longest", return_attention_mask=True, return_tensors="pt"
    ).input_features
    streamed = lf.long_form_features(tiny, audio)
    assert isinstance(streamed, lf.StreamedFeatures) and streamed.shape == tuple(whole.shape)
    for seek in (0, 1234, 2999, 7000, whole.shape[-1] - 500):
        assert torch.equal(lf.window_features(streamed, seek), lf.window_features(whole, seek)), seek


# --- lossy drafting (#21) ------------------------------------------------------------------


def test_the_repetition_guard_holds_a_reckless_energy_test(tiny, longform_audio, monkeypatch):
    """τ = −20, β = 0.5 accepts drafts the control finds e^20 times too unlikely. Without the
    guard, drafted repeats get through ("flickering flickering flickering", "that that"); with
    it a lossy rule never accepts a draft that completes a repeated span (only the exact test can)."""
    import crosswhisper
    import crosswhisper.decoding as decoding
    from crosswhisper.metrics import normalize_text

    audio = longform_audio[0][: 60 * 16000]

    def doubled(text: str) -> int:
        words = normalize_text(text).split()
        return sum(a == b for a, b in zip(words, words[1:]))

    # the promise itself: every accepted draft the guard (or the stop-token rule) flagged is the
    # control stream's argmax at its slot
    flagged_accepted = []
    verify_greedy = decoding.verify_greedy

    def watched(P_logits, drafts, valid, rule, q_hat=None, exact_only=None):
        n, next_token = verify_greedy(P_logits, drafts, valid, rule, q_hat, exact_only)
        target = P_logits.argmax(-1)
        for row, k in ([] if exact_only is None else exact_only.nonzero().tolist()):
            if k < n[row]:
                flagged_accepted.append(bool(drafts[row, k] == target[row, k]))
        return n, next_token

    monkeypatch.setattr(decoding, "verify_greedy", watched)
    reckless = dict(temperature=0.0, tau=-20.0, beta=0.5)
    guarded = crosswhisper.transcribe(audio, model=tiny, **reckless)
    assert flagged_accepted and all(flagged_accepted)
    monkeypatch.setattr(decoding, "repeats", lambda history, drafts, max_period=16: [False] * len(drafts))
    unguarded = crosswhisper.transcribe(audio, model=tiny, **reckless)
    exact = crosswhisper.transcribe(audio, model=tiny, temperature=0.0)
    print(f"doubled words: exact {doubled(exact.text)}, guarded {doubled(guarded.text)}, unguarded {doubled(unguarded.text)}")
    assert doubled(unguarded.text) >= 2  # what the guard is for
    # a guarded repeat can only be the control stream's own greedy choice, which a prefix the lossy
    # rule changed may still make ("on the outside outside" with the stage-10 adapter: exact 0,
    # guarded 1, unguarded 16); drafted loops are gone
    assert doubled(guarded.text) <= doubled(exact.text) + 1
    assert 4 * doubled(guarded.text) < doubled(unguarded.text)

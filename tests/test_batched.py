"""Batched decoding (DESIGN §1.6): every row of a batch is decoded exactly as alone.

Real weights (tiny.en, the shipped adapter) on real audio for the token identities; a toy model
with an enumerable sequence space for the sampling distribution of each row.
"""

import numpy as np
import pytest
import torch

from crosswhisper.audio import load_audio
from crosswhisper.decoding import DecodeOptions, decode_batch
from crosswhisper.lora import resolve_adapter
from crosswhisper.metrics import word_error_rate
from crosswhisper.whisper import decoder_prompt, encode, get_bundle, transcribe
from crosswhisper.whisper.batched import _Chunk, _Schedule, speech_chunks, transcribe_batch
from crosswhisper.whisper.decode import decode_window, decode_windows, special_id
from crosswhisper.writers import get_writer

from sampling_check import START, assert_samples_follow, sequence_probabilities, teacher_forcing_inputs


@pytest.fixture(scope="module")
def tiny():
    bundle = get_bundle("tiny.en")
    return bundle, resolve_adapter(bundle, "auto")


@pytest.fixture(scope="module")
def windows(tiny, test_clean, longform):
    """Encoder states of 7 test-clean clips and two 28 s stretches of the long file."""
    bundle, _ = tiny
    audio = [load_audio(path) for _, path, _ in test_clean]
    long = load_audio(longform[0])
    audio += [long[: 28 * 16000], long[40 * 16000 : 68 * 16000]]
    return torch.cat([encode(bundle, a) for a in audio])


@pytest.mark.parametrize("gamma", [0, 3], ids=["plain", "drafting"])
def test_every_row_is_its_window_decoded_alone(tiny, windows, gamma):
    """Rows accept different numbers of drafts, stop at different times (and leave the batch),
    and some start from longer prompts (previous text, left-padded): each row's tokens equal
    its window's batch-1 decode."""
    bundle, adapted = tiny
    adapted = adapted if gamma else None
    options = DecodeOptions(gamma=gamma, max_new_tokens=448, token_logprobs=True)
    start_of_prev = special_id(bundle, "<|startofprev|>")
    prompts = []
    for row in range(len(windows)):
        prompt = decoder_prompt(bundle, "en", timestamps=True)
        if row % 3 == 1:  # a previous-text prompt of its own length
            prompt = [start_of_prev] + bundle.tokenizer.encode(" and so on" * row, add_special_tokens=False) + prompt
        prompts.append(prompt)
    alone = [decode_window(bundle, windows[i : i + 1], p, adapted=adapted, options=options) for i, p in enumerate(prompts)]
    together = decode_windows(bundle, windows, prompts, adapted=adapted, options=options)
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert len({len(r.tokens) for r in together}) > 3  # rows really stop at different times
    for a, b in zip(alone, together):
        np.testing.assert_allclose(b.token_logprobs, a.token_logprobs, atol=1e-4)
        assert b.no_speech_prob == pytest.approx(a.no_speech_prob, abs=1e-5)
        assert b.forward_calls == a.forward_calls  # the same drafts accepted, call for call


def test_transcribe_batch_does_not_depend_on_batch_size(tiny, longform, test_clean, tmp_path):
    """The batched pipeline: a long file cut at pauses plus short files; batch 1 and batch 4
    (drafting in both) give the same tokens; segments carry real times; subtitles are written."""
    bundle, _ = tiny
    path, reference = longform
    inputs = [path] + [p for _, p, _ in test_clean[:3]]
    threads = torch.get_num_threads()
    one = transcribe_batch(inputs, model=bundle, batch_size=1, gamma=3)
    assert torch.get_num_threads() == threads  # (importing silero_vad sets torch's threads to 1)
    four = transcribe_batch(inputs, model=bundle, batch_size=4, gamma=3)
    assert [r.tokens for r in four] == [r.tokens for r in one]
    long = four[0]
    assert long.windows >= 4  # 103 s in chunks of at most 30 s
    assert word_error_rate([reference], [long.text]) < 0.15
    starts = [s.start for s in long.segments]
    assert starts == sorted(starts) and 0 <= starts[0] and long.segments[-1].end <= long.duration + 0.5
    assert all(s.end > s.start for s in long.segments)
    # subtitles never overlap: no segment runs past its chunk's audio, chunks are disjoint
    assert all(a.end <= b.start + 1e-6 for a, b in zip(long.segments, long.segments[1:]))
    assert long.stats.tokens_per_forward > 1.2  # drafted
    assert word_error_rate([text for _, _, text in test_clean[:3]], [r.text for r in four[1:]]) < 0.15
    get_writer("srt", tmp_path)(long, path)
    assert (tmp_path / "1088-134318.srt").read_text().count(" --> ") == len(long.segments)
    # transcribe(batch_size=) is the same pipeline for one input
    assert transcribe(path, model=bundle, batch_size=4, gamma=3).tokens == long.tokens


def test_int8_rows_do_not_depend_on_batch_size(tiny, longform, test_clean):
    """compute_type="int8" (int8 encoder and vocabulary projection, per-row activations): a
    window's tokens are the same alone and in a batch, drafted or not."""
    bundle, _ = tiny
    inputs = [longform[0]] + [p for _, p, _ in test_clean[:3]]
    one = transcribe_batch(inputs, model=bundle, batch_size=1, gamma=0, compute_type="int8")
    four = transcribe_batch(inputs, model=bundle, batch_size=4, gamma=3, compute_type="int8")
    assert [r.tokens for r in four] == [r.tokens for r in one]
    assert word_error_rate([longform[1]], [one[0].text]) < 0.15


def test_speech_chunks_cut_long_audio_at_pauses(longform):
    audio = load_audio(longform[0])
    chunks = speech_chunks(audio)
    assert len(chunks) >= 4
    assert all(0 < end - start <= 30 * 16000 for start, end in chunks)
    assert all(a[1] <= b[0] for a, b in zip(chunks, chunks[1:]))  # in order, not overlapping
    assert all(start % 160 == 0 for start, _ in chunks)  # on a log-mel frame: exact timestamps
    assert speech_chunks(audio[: 10 * 16000]) == [(0, 10 * 16000)]  # one window: not cut
    assert speech_chunks(np.zeros(60 * 16000, dtype=np.float32)) == []  # a minute of silence: nothing to decode


def test_a_rest_joins_its_inputs_next_chunk_when_both_fit():
    """The schedule: even chunks first, an odd one once its predecessor is decoded, with that
    one's rest prepended when the two fit in 30 s; other rests alone."""
    second = 16000
    audio = np.zeros(100 * second, dtype=np.float32)
    spans = [(0, 25), (26, 40), (41, 70), (71, 99)]
    chunks = [_Chunk(0, a * second, audio[a * second : b * second], i) for i, (a, b) in enumerate(spans)]
    schedule = _Schedule(chunks, [audio])
    first = schedule.next_batch(8)
    assert [c.index for c in first] == [0, 2]  # 1 and 3 wait for their predecessors
    schedule.done(first[0], 20 * second)  # 5 s left over: joins chunk 1 (20–40 s fits)
    schedule.done(first[1], 50 * second)  # 20 s left over: 50–99 s does not fit, decoded alone
    second_batch = schedule.next_batch(8)
    assert [(c.index, c.start, c.end) for c in second_batch] == [
        (1, 20 * second, 40 * second), (None, 50 * second, 70 * second), (3, 71 * second, 99 * second)]
    for chunk in second_batch:
        schedule.done(chunk, None)
    assert not schedule


def test_silence_and_clicks_give_empty_transcripts(tiny, test_clean):
    """Digital silence, a 50 ms click and white noise batched with speech: nothing invented for
    them, the speech transcribed (the sequential loop's rules)."""
    bundle, _ = tiny
    noise = np.random.default_rng(0).normal(0, 0.1, 20 * 16000).astype(np.float32)
    click = np.random.default_rng(1).normal(0, 0.3, 800).astype(np.float32)
    inputs = [np.zeros(10 * 16000, dtype=np.float32), click, noise, load_audio(test_clean[0][1])]
    results = transcribe_batch(inputs, model=bundle, batch_size=4)
    assert [r.text for r in results[:3]] == ["", "", ""]
    assert word_error_rate([test_clean[0][2]], [results[3].text]) < 0.25


def test_batch_size_is_validated(tiny, test_clean):
    bundle, _ = tiny
    with pytest.raises(ValueError, match="batch_size"):
        transcribe_batch([test_clean[0][1]], model=bundle, batch_size=0)
    with pytest.raises(TypeError, match="list"):
        transcribe_batch(str(test_clean[0][1]), model=bundle)


@pytest.mark.slow  # statistical, ~15 s
def test_batched_sampling_keeps_each_rows_distribution(tiny_random_whisper, one_thread):
    """Two rows over different audio, sampled together: each row's sequences follow its own
    control stream's distribution (chi-square against teacher-forced probabilities)."""
    from crosswhisper.whisper.streams import WhisperStreams

    peft_model, gate, encoder_states = tiny_random_whisper
    audio = torch.cat([encoder_states, 20 * torch.randn(1, *encoder_states.shape[1:], generator=torch.Generator().manual_seed(3))])
    inputs = teacher_forcing_inputs()
    exact = []
    gate.gate = torch.zeros(1, 1, 1)
    with torch.no_grad():
        for row in range(2):
            logits = peft_model.base_model.model(
                encoder_outputs=(audio[row : row + 1].expand(len(inputs), -1, -1),), decoder_input_ids=inputs
            ).logits
            exact.append(sequence_probabilities(logits))
    gate.gate = None
    assert (exact[0] - exact[1]).abs().max() > 0.05  # the rows' distributions differ

    whisper = peft_model.base_model.model
    streams = WhisperStreams(
        whisper.model.decoder, whisper.proj_out, audio, process_logits=lambda logits, index, tokens: logits,
        drafting=True, max_length=16,
    )
    options = DecodeOptions(gamma=3, temperature=1.0, max_new_tokens=3)
    g = torch.Generator().manual_seed(11)
    draws = [decode_batch(streams, [[START], [START]], options=options, eos_token_id=-1, placeholder_id=1, generator=g)
             for _ in range(2000)]
    for row in range(2):
        results = iter(draws)
        assert_samples_follow(exact[row], lambda: (lambda r: (r[row].tokens, r[row].forward_calls))(next(results)))

"""Text LMs on the same core: the bundled SmolLM2-135M-Instruct (GGUF, offline) decoded by
Cross-Regression must give exactly what transformers `generate` gives, and a toy Llama whose
sequences can be enumerated must sample exactly the base distribution."""

import json

import pytest
import torch
from sampling_check import LENGTH, START, V, assert_samples_follow, sequence_probabilities, teacher_forcing_inputs

from crosswhisper import lm as text_lm
from crosswhisper.decoding import DecodeOptions
from crosswhisper.lm import (
    DEFAULT_LM,
    Generation,
    LanguageModel,
    decode_token_batch,
    decode_tokens,
    encode_prompt,
    generate,
    generate_reference,
    get_lm,
    weights_fingerprint,
)
from crosswhisper.lora import load_adapter, new_adapter, save_adapter, shipped_adapter_for

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
    [{"role": "user", "content": "List three uses of copper."}],
    "The history of the printing press",  # raw text: continued as is
]
MAX_NEW = 40


@pytest.fixture(scope="module")
def smollm():
    return get_lm(DEFAULT_LM)


@pytest.fixture(scope="module")
def references(smollm):
    """transformers `generate` greedy for every prompt: the reference of exactness."""
    return [generate_reference(smollm, encode_prompt(smollm, p), temperature=0, max_new_tokens=MAX_NEW) for p in PROMPTS]


def test_bundled_model_loads_offline_with_its_chat_template(smollm):
    assert smollm.model.config.model_type == "llama"
    ids = encode_prompt(smollm, PROMPTS[0])
    text = smollm.tokenizer.decode(ids)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")  # the assistant turn is opened
    assert smollm.tokenizer.convert_ids_to_tokens(list(smollm.eos_token_ids)) == ["<|im_end|>"]


@pytest.mark.parametrize("gamma", [0, pytest.param(1, marks=pytest.mark.slow), 4])  # γ = 1: ~12 s, slow
def test_random_adapter_greedy_is_token_identical_to_generate(smollm, references, gamma):
    adapted = new_adapter(smollm, rank=8, random_init=True, seed=1)  # the worst drafter
    for prompt, reference in zip(PROMPTS, references):
        out = decode_tokens(
            smollm, encode_prompt(smollm, prompt), adapted=adapted, options=DecodeOptions(gamma=gamma, max_new_tokens=MAX_NEW)
        )
        assert out.tokens == reference, prompt


def test_shipped_adapter_greedy_is_token_identical_and_drafts(smollm, references):
    assert shipped_adapter_for(smollm) is not None, "no adapter ships for the bundled SmolLM2"
    for prompt, reference in zip(PROMPTS, references):
        out = generate(prompt, model=smollm, max_new_tokens=MAX_NEW)  # adapter="auto", default γ
        assert list(out.tokens) == reference, prompt
        assert out.stats.forward_calls <= len(reference)


@pytest.mark.parametrize("gamma", [0, 4])
def test_batched_rows_are_token_identical_to_generate(smollm, references, gamma):
    """The prompts as one batch (different lengths: left-padded; rows accept different numbers
    of drafts and stop apart): every row equals transformers' greedy `generate` of its prompt."""
    adapted = new_adapter(smollm, rank=8, random_init=True, seed=1)  # the worst drafter: rows diverge
    ids = [encode_prompt(smollm, prompt) for prompt in PROMPTS]
    assert len({len(i) for i in ids}) > 1
    out = decode_token_batch(smollm, ids, adapted=adapted, options=DecodeOptions(gamma=gamma, max_new_tokens=MAX_NEW))
    assert [r.tokens for r in out] == references
    batch = generate(PROMPTS, model=smollm, max_new_tokens=MAX_NEW)  # a list → a batch, shipped adapter
    assert [list(g.tokens) for g in batch] == references
    assert all(g.stats.tokens_per_forward >= 1 for g in batch)


@pytest.mark.slow  # statistical, ~10 s
def test_batched_sampling_matches_ancestral_sampling(toy_llama, one_thread):
    """Two prompts of different lengths sampled as one batch: each row's sequences follow the
    base model's distribution after its prompt."""
    toy, adapted = toy_llama
    inputs = teacher_forcing_inputs()
    with torch.no_grad():
        exact = [sequence_probabilities(toy.model(inputs).logits),
                 sequence_probabilities(toy.model(torch.cat([torch.full((len(inputs), 1), 2), inputs], 1)).logits[:, 1:])]
    g = torch.Generator().manual_seed(5)
    options = DecodeOptions(gamma=3, temperature=1.0, max_new_tokens=LENGTH)
    draws = [decode_token_batch(toy, [[START], [2, START]], adapted=adapted, options=options, generator=g) for _ in range(2000)]
    for row in range(2):
        results = iter(draws)
        assert_samples_follow(exact[row], lambda: (lambda r: (r[row].tokens, r[row].forward_calls))(next(results)))


@pytest.mark.slow  # held-out figure, ~190 s
def test_shipped_adapter_drafts_on_held_out_prompts(smollm):
    """Issue #6: > 1.5 tokens per forward on the held-out prompts (other books than the training
    prompts), recorded beside the adapter: all 24, at most 128 new tokens, lossless γ = 3.
    The shipped adapter reaches 1.60 (its card); an untrained one ~1.02."""
    directory = shipped_adapter_for(smollm)
    prompts = json.loads((directory / "held_out_prompts.json").read_text())
    assert len(prompts) == 24
    tokens = calls = 0
    for messages in prompts.values():
        ids = encode_prompt(smollm, messages)
        out = generate(messages, model=smollm, gamma=3, max_new_tokens=128)
        assert list(out.tokens) == generate_reference(smollm, ids, temperature=0, max_new_tokens=128)
        tokens += out.stats.generated_tokens
        calls += out.stats.forward_calls
    assert tokens / calls > 1.5, f"{tokens / calls:.3f} tokens per forward"


def test_generate_result_and_reference_path(smollm, references):
    out = generate(PROMPTS[0], model=smollm, adapter=None, max_new_tokens=MAX_NEW)
    assert isinstance(out, Generation)
    assert list(out.tokens) == references[0] and out.finish_reason == "stop"
    assert "Paris" in out.text and "<|im_end|>" not in out.text
    short = generate(PROMPTS[1], model=smollm, max_new_tokens=5)
    assert len(short.tokens) == 5 and short.finish_reason == "length"
    assert short.stats.generated_tokens == 5 and short.stats.forward_calls >= 1


def test_sampling_is_reproducible_with_a_seed(smollm):
    a = generate(PROMPTS[1], model=smollm, temperature=0.8, seed=3, max_new_tokens=20)
    b = generate(PROMPTS[1], model=smollm, temperature=0.8, seed=3, max_new_tokens=20)
    assert a.tokens == b.tokens


def test_bad_input_is_refused(smollm, tmp_path):
    with pytest.raises(TypeError):
        generate(42, model=smollm)
    with pytest.raises(ValueError):
        generate("hi", model=smollm, beta=1.5)
    with pytest.raises(FileNotFoundError):
        text_lm.load_lm(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError):
        text_lm.load_lm(str(tmp_path))  # a directory without config.json


def test_adapter_for_other_weights_is_refused(smollm, tmp_path):
    adapted = new_adapter(smollm, rank=2, seed=0)
    other = LanguageModel(name="other", model=smollm.model, tokenizer=smollm.tokenizer, weights_sha256="0" * 64)
    save_adapter(adapted, tmp_path / "adapter", other)
    with pytest.raises(ValueError, match="made for base model"):
        load_adapter(smollm, tmp_path / "adapter")
    from crosswhisper.lora import shipped_adapter

    with pytest.raises(ValueError):  # a Whisper adapter on a text LM
        load_adapter(smollm, shipped_adapter("tiny.en"))


# --- sampling exactness through lm.py, on an enumerable toy Llama ----------------------------


@pytest.fixture(scope="module")
def toy_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=0, eos_token_id=V,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = V  # outside the vocabulary: every sequence runs LENGTH tokens
    with torch.no_grad():  # sharpen the random model so that P is far from uniform
        model.lm_head.weight.mul_(8.0)
    toy = LanguageModel(name="toy-llama", model=model, tokenizer=None, weights_sha256=weights_fingerprint(model))
    return toy, new_adapter(toy, rank=4, random_init=True, seed=0)


@pytest.mark.slow  # statistical, ~10 s
def test_sampling_lossless_matches_ancestral_sampling(toy_llama, one_thread):
    toy, adapted = toy_llama
    with torch.no_grad():
        exact = sequence_probabilities(toy.model(teacher_forcing_inputs()).logits)
    g = torch.Generator().manual_seed(7)
    options = DecodeOptions(gamma=3, temperature=1.0, max_new_tokens=LENGTH)

    def sample():
        out = decode_tokens(toy, [START], adapted=adapted, options=options, generator=g)
        return out.tokens, out.forward_calls

    assert_samples_follow(exact, sample)


def test_lm_student_sees_what_the_predictive_stream_sees_at_inference(toy_llama):
    """Algorithm 3 on a text LM trains on exactly the block inference computes."""
    from crosswhisper.dual_stream import HFDualStream
    from crosswhisper.training import Example, LMTask

    toy, adapted = toy_llama
    tokens = torch.tensor([0, 3, 1, 4, 2, 2, 1, 3, 0, 4, 1])
    example = Example(utterance="toy", encoder_states=None, tokens=tokens, prompt_length=1)
    task = LMTask(toy)
    cut, drafts = 5, torch.tensor([[3, 0, toy.placeholder_id]])
    _, cache = task.teacher_pass(example)
    with torch.no_grad():
        train_logits = task.student_logits(adapted, example, torch.tensor([cut]), drafts, cache)[0]

    causal_lm = adapted.peft_model.base_model.model
    streams = HFDualStream(
        causal_lm.get_decoder(), causal_lm.get_output_embeddings(), None,
        process_logits=lambda logits, index, tokens: logits, gate=adapted.gate, drafting=True, max_length=16,
    )
    streams.reset(1)
    streams.forward_block(tokens[:cut].view(1, -1), torch.empty(1, 0, dtype=torch.long))
    streams.commit(cut)
    infer_logits = streams.forward_block(tokens[cut : cut + 1].view(1, -1), drafts).predictive_logits[0]
    assert torch.allclose(train_logits, infer_logits, atol=1e-4)


def test_lm_training_steps_checkpoint_and_resume(toy_llama, tmp_path):
    from crosswhisper.training import Example, TrainingConfig, train

    toy, _ = toy_llama
    g = torch.Generator().manual_seed(0)
    examples = [
        Example(utterance=str(i), encoder_states=None, tokens=torch.randint(V, (12,), generator=g), prompt_length=2)
        for i in range(3)
    ]
    config = TrainingConfig(gamma=3, rank=2, steps=2, cuts_per_utterance=2, utterances_per_step=1, checkpoint_every=1)
    train(toy, examples, config, output_dir=tmp_path)
    adapted = train(toy, examples, TrainingConfig(**{**config.__dict__, "steps": 3}), output_dir=tmp_path)
    assert torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["step"] == 3
    assert any(p.abs().sum() > 0 for n, p in adapted.peft_model.named_parameters() if "lora_B" in n)
    with pytest.raises(ValueError, match="another configuration"):  # never resume someone else's run
        train(toy, examples, TrainingConfig(**{**config.__dict__, "rank": 4}), output_dir=tmp_path)
    fresh = TrainingConfig(**{**config.__dict__, "draft_source": "previous-block"})
    assert fresh.run_name() != config.run_name()
    train(toy, examples, fresh, output_dir=tmp_path / fresh.run_name())


def test_generate_cli(smollm, capsys):
    from crosswhisper.cli import generate_main

    assert generate_main(["What is the capital of France?", "--max-new-tokens", "12", "--stats"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out and "forward calls" in captured.err
    assert generate_main(["Once upon a time", "--raw", "--no-adapter", "--max-new-tokens", "4"]) == 0
    with pytest.raises(SystemExit):
        generate_main(["hi", "--gamma", "-1"])


def _toy_draft_case(toy_llama, *, truth: float):
    """A toy example, its task, a replay buffer (γ = 3) starting at `truth` and the teacher cache."""
    from crosswhisper.training import Example, LMTask, ReplayBuffer

    toy, adapted = toy_llama
    tokens = torch.tensor([0, 3, 1, 4, 2, 2, 1, 3, 0, 4, 1])
    example = Example(utterance="toy", encoder_states=None, tokens=tokens, prompt_length=2)
    task = LMTask(toy)
    replay = ReplayBuffer([example], 3, V, toy.placeholder_id, torch.Generator().manual_seed(0), truth=truth, alternatives=True)
    _, cache = task.teacher_pass(example)
    return toy, adapted, example, task, replay, cache


def test_previous_block_drafts_are_what_inference_feeds_after_a_rejection(toy_llama):
    """draft_source="previous-block": a block at cut gets the student's slots 1..γ of the block
    at cut − 1 (as inference refills after rejecting d_1); the first cut gets placeholders."""
    from crosswhisper.training import TrainingConfig
    from crosswhisper.training.data import _previous_block_drafts

    toy, adapted, example, task, replay, cache = _toy_draft_case(toy_llama, truth=0.0)
    gamma, low = 3, 1
    cuts = torch.tensor([low, 5])
    earlier = replay.drafts(example, torch.tensor([4]), gamma)
    with torch.no_grad():
        expected = task.student_logits(adapted, example, torch.tensor([4]), earlier, cache)[0, 1:].argmax(-1)

    drafts = _previous_block_drafts(task, adapted, example, cuts, replay, gamma, low, cache)
    assert drafts[0].tolist() == [toy.placeholder_id] * gamma
    assert torch.equal(drafts[1], expected)
    assert torch.equal(replay.drafts(example, torch.tensor([5]), gamma)[0], expected)  # the buffer keeps them
    with pytest.raises(ValueError, match="draft_source"):
        TrainingConfig(draft_source="teacher")


def test_previous_block_drafts_follow_a_rejected_draft(toy_llama):
    """rejected_draft_prob=1: the earlier block's draft for the cut position is wrong, as at
    inference (a block starts where the draft was rejected): the student's first choice if
    wrong, else its second choice, which the buffer keeps next to the first."""
    from crosswhisper.training import TrainingConfig
    from crosswhisper.training.data import _previous_block_drafts

    toy, adapted, example, task, replay, cache = _toy_draft_case(toy_llama, truth=1.0)
    tokens, gamma, low = example.tokens, 3, 1
    positions = torch.tensor([5, 6])
    replay.alternatives["toy"][positions] = torch.tensor([0, 4])
    replay.predictions["toy"][6] = 3  # a wrong first choice stays
    assert replay.wrong_draft(example, positions).tolist() == [0, 3]

    earlier = replay.drafts(example, torch.tensor([4]), gamma)
    assert earlier[0, 0] == tokens[5]  # the buffer started from the truth
    earlier[0, 0] = 0
    with torch.no_grad():
        logits = task.student_logits(adapted, example, torch.tensor([4]), earlier, cache)[0, 1:]
    generator = torch.Generator().manual_seed(0)
    drafts = _previous_block_drafts(task, adapted, example, torch.tensor([5]), replay, gamma, low, cache, 1.0, generator)
    assert torch.equal(drafts[0], logits.argmax(-1))
    assert torch.equal(replay.alternatives["toy"][6:9], logits.topk(2, dim=-1).indices[:, 1])
    with pytest.raises(ValueError, match="previous-block"):
        TrainingConfig(rejected_draft_prob=0.5)
    # runs without wrong drafts keep no second choices and draw nothing more from the generator
    # than before they existed (their seeds reproduce earlier runs)
    from crosswhisper.training import ReplayBuffer

    generator, expected = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    plain = ReplayBuffer([example], gamma, V, toy.placeholder_id, generator, truth=0.5)
    flip = torch.rand(tokens.shape, generator=expected) < 0.5
    torch.randint(V, (int(flip.sum()),), generator=expected)
    assert plain.alternatives == {} and torch.equal(generator.get_state(), expected.get_state())
    plain.update(example, torch.tensor([4]), torch.zeros(1, gamma, dtype=torch.long), torch.ones(1, gamma, dtype=torch.long))
    assert "rej0.9" in TrainingConfig(draft_source="previous-block", rejected_draft_prob=0.9).run_name()


def test_chained_previous_blocks_feed_each_other(toy_llama):
    """previous_blocks=2: the block at cut − 1 reads the drafts of the block at cut − 2."""
    from crosswhisper.training import TrainingConfig
    from crosswhisper.training.data import _previous_block_drafts

    _, adapted, example, task, replay, cache = _toy_draft_case(toy_llama, truth=1.0)
    gamma, low = 3, 1
    with torch.no_grad():
        earliest = replay.drafts(example, torch.tensor([3]), gamma)
        middle = task.student_logits(adapted, example, torch.tensor([3]), earliest, cache)[:, 1:].argmax(-1)
        expected = task.student_logits(adapted, example, torch.tensor([4]), middle, cache)[0, 1:].argmax(-1)
    drafts = _previous_block_drafts(task, adapted, example, torch.tensor([5]), replay, gamma, low, cache, depth=2)
    assert torch.equal(drafts[0], expected)
    assert "chain2" in TrainingConfig(draft_source="previous-block", previous_blocks=2).run_name()
    with pytest.raises(ValueError, match="previous_blocks"):
        TrainingConfig(previous_blocks=2)


def test_training_warm_starts_from_a_saved_adapter(toy_llama, tmp_path):
    from crosswhisper.lora import save_adapter
    from crosswhisper.training import Example, TrainingConfig, train

    toy, _ = toy_llama
    example = Example(utterance="0", encoder_states=None, tokens=torch.arange(12) % V, prompt_length=2)
    config = TrainingConfig(gamma=3, rank=2, steps=3, cuts_per_utterance=2, utterances_per_step=1)
    first = train(toy, [example], config, output_dir=tmp_path / "first")
    save_adapter(first, tmp_path / "saved", toy)
    assert any(p.abs().sum() > 0 for n, p in first.peft_model.named_parameters() if "lora_B" in n)

    warm = TrainingConfig(**{**config.__dict__, "steps": 0, "init_adapter": str(tmp_path / "saved")})
    again = train(toy, [example], warm, output_dir=tmp_path / warm.run_name())
    before = dict(first.peft_model.named_parameters())
    for name, parameter in again.peft_model.named_parameters():
        if "lora_" in name:  # float16 on disk
            assert torch.allclose(parameter, before[name], atol=1e-3), name
    other_rank = TrainingConfig(**{**warm.__dict__, "rank": 1})  # a higher rank grows (test_training)
    with pytest.raises(ValueError, match="warm-start"):
        train(toy, [example], other_rank, output_dir=tmp_path / "other")

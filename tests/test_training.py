"""Algorithm 3 pieces, and the promise that training sees exactly what inference computes."""

import dataclasses

import pytest
import torch

from crosswhisper.dual_stream import HFDualStream, block_mask
from crosswhisper.training import (
    ReplayBuffer,
    TrainingConfig,
    WhisperTask,
    distillation_step,
    prepare_examples,
    reused_slots,
    suffix_weights,
    train,
)
from crosswhisper.training.loop import _warm_start
from crosswhisper.training.tasks import _teacher_pass, student_logits
from crosswhisper.lora import new_adapter, save_adapter
from crosswhisper.whisper import get_bundle, logits_processor, special_id


@pytest.fixture(scope="module")
def setup(test_clean):
    bundle = get_bundle("tiny.en")
    examples = prepare_examples(bundle, [path for _, path, _ in test_clean[:2]])
    return bundle, examples


def test_suffix_weights():
    hits = torch.tensor([[1, 1, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    # s_t = run of correct predictions after t; weight s_t + 1, zero where there is no target
    assert suffix_weights(hits, valid).tolist() == [[2, 1, 3, 2, 0], [1, 1, 1, 1, 1]]


def test_reused_slots_are_the_predictions_inference_drafts_with():
    """reused_slots marks the slots whose predictions the decode loop puts in the next block:
    checked against verify_greedy + DraftBuffer.refill on blocks with every first-wrong slot."""
    from crosswhisper.acceptance import AcceptanceRule, DraftBuffer, verify_greedy

    gamma, vocab, placeholder = 4, 50, 49
    tokens = torch.arange(10, 30)  # the true sequence; no token equals the placeholder
    cuts = torch.tensor([3, 3, 3, 3, 3, 16, 17])
    drafts = tokens[(cuts.view(-1, 1) + torch.arange(1, gamma + 1)).clamp_max(len(tokens) - 1)].clone()
    drafts[0, 0] = 0  # first draft wrong: n = 0
    drafts[1, 2] = 0  # n = 2, later drafts right again
    drafts[2, 3] = placeholder  # an empty slot ends the accepted prefix: n = 3
    # row 3: all right, n = 4 (nothing reused); row 4: right then wrong then placeholder
    drafts[4, 1], drafts[4, 2:] = 0, placeholder
    drafts[5:, :] = torch.tensor([[27, 28, 29, placeholder], [28, 29, placeholder, placeholder]])  # the end
    reused = reused_slots(drafts, tokens, cuts)
    assert reused.tolist()[:5] == [
        [False, True, True, True, True],
        [False, False, False, True, True],
        [False, False, False, False, True],
        [False] * 5,
        [False, False, True, True, True],
    ]
    rule = AcceptanceRule(beta=0.0, tau=0.0, gamma=gamma)
    for row in range(len(cuts)):
        targets = tokens[(cuts[row] + torch.arange(1, gamma + 2)).clamp_max(len(tokens) - 1)]
        control = torch.nn.functional.one_hot(targets, vocab).float().unsqueeze(0)  # argmax = truth
        valid = drafts[row : row + 1] != placeholder
        n, _ = verify_greedy(control, drafts[row : row + 1], valid, rule)
        buffer = DraftBuffer.empty(1, gamma, vocab, placeholder=placeholder, proposals=False)
        buffer.refill(int(n[0]), torch.arange(gamma + 1), None)  # slot j predicts token j
        drafted_from = set(buffer.tokens[0][buffer.valid[0]].tolist())
        assert drafted_from == {j for j in range(gamma + 1) if reused[row, j]}, row
    assert TrainingConfig(reused_slots_only=True).run_name().endswith("-reused")


def test_block_mask_pattern():
    allowed = block_mask(torch.tensor([2, 4]), cached=5, block=3, dtype=torch.float32) == 0
    assert allowed[0, 0, 0].tolist() == [True, True, False, False, False, True, False, False]
    assert allowed[0, 0, 1].tolist() == [True, True, False, False, False, True, True, True]
    assert allowed[1, 0, 2].tolist() == [True, True, True, True, False, True, True, True]


def test_student_sees_what_the_predictive_stream_sees_at_inference(setup):
    """Train and infer with the same block structure: same logits for the same block."""
    bundle, examples = setup
    ex = examples[0]
    adapted = new_adapter(bundle, rank=8, random_init=True, seed=3)
    cut, gamma = 9, 4
    drafts = ex.tokens[cut + 1 : cut + 1 + gamma].clone()
    drafts[2] = special_id(bundle, "<|endoftext|>")  # a placeholder in the middle
    _, cache = _teacher_pass(bundle, ex)
    with torch.no_grad():
        train_logits = student_logits(adapted, ex, torch.tensor([cut]), drafts.view(1, -1), cache)[0]

    whisper = adapted.peft_model.base_model.model
    hidden = ex.encoder_states.to(whisper.dtype)
    streams = HFDualStream(
        whisper.model.decoder, whisper.proj_out, hidden, process_logits=logits_processor(bundle, ex.prompt_length),
        gate=adapted.gate, drafting=True, max_length=448,
    )
    streams.reset(1)
    streams.forward_block(ex.tokens[:cut].view(1, -1), torch.empty(1, 0, dtype=torch.long))
    streams.commit(cut)
    out = streams.forward_block(ex.tokens[cut : cut + 1].view(1, -1), drafts.view(1, -1))
    infer_logits = out.predictive_logits[0]
    finite = torch.isfinite(infer_logits)  # inference applies the suppress masks
    assert torch.allclose(train_logits[finite], infer_logits[finite], atol=2e-3)
    assert torch.equal(train_logits.masked_fill(~finite, -float("inf")).argmax(-1), infer_logits.argmax(-1))


def test_a_block_at_the_end_of_a_full_window_trains(setup):
    """Long-form windows can fill the decoder (prompt + tokens = 448 positions): a block cut at
    the last token reaches past the last position with slots that have no target (a crash until
    2026-12-01, when training on whole chapters first met such a window)."""
    bundle, examples = setup
    ex = examples[0]
    full = bundle.model.config.max_target_positions
    generated = ex.tokens[ex.prompt_length :]
    tokens = torch.cat([ex.tokens[: ex.prompt_length], generated.repeat(full // len(generated) + 1)])[:full]
    window = dataclasses.replace(ex, tokens=tokens)
    adapted = new_adapter(bundle, rank=4, seed=0)
    _, cache = _teacher_pass(bundle, window)
    cuts = torch.tensor([full - 2, full - 10])
    drafts = torch.full((2, 4), special_id(bundle, "<|endoftext|>"))
    with torch.no_grad():
        logits = student_logits(adapted, window, cuts, drafts, cache)
    assert logits.shape[:2] == (2, 5) and torch.isfinite(logits).all()


def test_training_steps_checkpoint_and_resume(setup, tmp_path):
    bundle, examples = setup
    config = TrainingConfig(gamma=4, rank=4, steps=2, cuts_per_utterance=2, utterances_per_step=1, checkpoint_every=1)
    train(bundle, examples, config, output_dir=tmp_path)
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 2
    longer = TrainingConfig(**{**config.__dict__, "steps": 3})
    adapted = train(bundle, examples, longer, output_dir=tmp_path)  # resumes at step 2
    assert torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["step"] == 3
    assert any(p.abs().sum() > 0 for n, p in adapted.peft_model.named_parameters() if "lora_B" in n)


def test_distillation_loss_trains_only_the_adapter(setup):
    bundle, examples = setup
    adapted = new_adapter(bundle, rank=4, seed=0)
    adapted.peft_model.train()
    config = TrainingConfig(gamma=4, rank=4, cuts_per_utterance=3)
    g = torch.Generator().manual_seed(0)
    replay = ReplayBuffer(examples, 4, bundle.model.config.vocab_size, special_id(bundle, "<|endoftext|>"), g)
    loss, info = distillation_step(bundle, adapted, examples[0], replay, config, g)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= info["hits"] <= 1
    grads = {n for n, p in adapted.peft_model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(p.grad is None for p in bundle.model.parameters())


def test_warm_start_into_a_higher_rank_keeps_the_function_and_trains_every_rank(setup, tmp_path):
    """A rank-4 adapter warm-starts a rank-8 one: same predictive logits, and the new ranks are
    not dead (their A rows are random, so their B columns get gradient)."""
    bundle, examples = setup
    ex = examples[0]
    save_adapter(new_adapter(bundle, rank=4, random_init=True, seed=5), tmp_path, bundle)
    small, grown = new_adapter(bundle, rank=4), new_adapter(bundle, rank=8, seed=6)
    _warm_start(WhisperTask(bundle), small, tmp_path)
    _warm_start(WhisperTask(bundle), grown, tmp_path)
    _, cache = _teacher_pass(bundle, ex)
    cuts, drafts = torch.tensor([9]), ex.tokens[10:14].view(1, -1)
    with torch.no_grad():
        expected = student_logits(small, ex, cuts, drafts, cache)
    logits = student_logits(grown, ex, cuts, drafts, cache)
    assert torch.allclose(logits, expected, atol=1e-4)
    logits.logsumexp(-1).sum().backward()
    for name, weight in grown.peft_model.named_parameters():
        if "lora_B" in name:
            assert weight.grad[:, 4:].abs().sum() > 0, name
    with pytest.raises(ValueError, match="rank"):
        _warm_start(WhisperTask(bundle), new_adapter(bundle, rank=2), tmp_path)


def test_the_recipe_joins_chapters_and_starts_them_later(tmp_path):
    """--start-offsets: each joined chapter once per offset, the later ones the same audio
    without its first seconds (other long-form window cuts of the same speech)."""
    import random
    from pathlib import Path

    import soundfile as sf
    from conftest import load_script

    root = Path(__file__).resolve().parents[1]
    recipe = load_script(root / "recipes" / "train_whisper_adapter.py", "train_whisper_adapter")
    subset = root / "tests" / "data" / "LibriSpeech" / "test-clean"

    files, seconds = recipe.joined_chapters(subset, None, (), 60.0, None, tmp_path, random.Random(0), (0.0, 2.5))
    assert len(files) == 2 * 3 and len({f.name for f in files}) == 6
    for whole in [f for f in files if "-from" not in f.name]:
        later = whole.with_name(f"{whole.stem}-from2.5s.flac")
        assert later in files
        full, rate = sf.read(whole, dtype="float32")
        cut, _ = sf.read(later, dtype="float32")
        assert rate == 16000
        assert len(full) - len(cut) == int(2.5 * rate) and (cut == full[int(2.5 * rate):]).all()
    assert seconds == pytest.approx(sum(sf.info(f).duration for f in files))
    # --train-minutes counts each chapter once, whatever the offsets
    _, first = recipe.joined_chapters(subset, None, (), 60.0, 1e-9, tmp_path, random.Random(0))
    minutes = 1.5 * first / 60
    once, _ = recipe.joined_chapters(subset, None, (), 60.0, minutes, tmp_path, random.Random(0))
    offset, _ = recipe.joined_chapters(subset, None, (), 60.0, minutes, tmp_path, random.Random(0), (0.0, 2.5))
    assert len(once) == 2 and [f for f in offset if "-from" not in f.name] == once

import importlib.util
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

# Test data shipped in the repository (tests/data/README.md says where each file comes from).
DATA = Path(__file__).resolve().parent / "data"
TEST_CLEAN = DATA / "LibriSpeech" / "test-clean"
LONGFORM = DATA / "longform" / "1088-134318"  # .flac + .txt: 103 s of one LibriSpeech chapter
LANGUAGES = ("de", "es", "it")  # tests/data/languages/<lang>.flac, espeak-ng speech
# The larger data beside the repository (../shared/data), for training and larger evaluations.
# A test that needs it must be marked slow and skip when it is absent (shared_data fixture).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"



def load_script(path: Path, name: str):
    """A script of the repository (eval/, recipes/) as a module, as `python path` runs it: its
    folder on sys.path (for the modules beside it) and registered (dataclasses look it up)."""
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

def librispeech_utterances(subset_dir: Path) -> list[tuple[str, Path, str]]:
    """(utterance id, audio path, reference transcript) in a canonical LibriSpeech tree."""
    items = []
    for trans in sorted(subset_dir.glob("*/*/*.trans.txt")):
        for line in trans.read_text().splitlines():
            utt, _, text = line.partition(" ")
            audio = next(trans.parent.glob(f"{utt}.*"))
            items.append((utt, audio, text))
    return items


@pytest.fixture(scope="session")
def test_clean() -> list[tuple[str, Path, str]]:
    if not TEST_CLEAN.is_dir():
        pytest.fail(f"LibriSpeech test-clean not found at {TEST_CLEAN} (part of the repository: tests/data)")
    items = librispeech_utterances(TEST_CLEAN)
    assert len(items) == 7
    return items


@pytest.fixture(scope="session")
def test_clean_audio(test_clean):
    """utterance id → 16 kHz float32 waveform."""
    return {utt: sf.read(path, dtype="float32")[0] for utt, path, _ in test_clean}


@pytest.fixture(scope="session")
def longform() -> tuple[Path, str]:
    """(16 kHz FLAC of 103 s, its reference transcript): 8 utterances of one chapter, 0.5 s apart."""
    audio, text = LONGFORM.with_suffix(".flac"), LONGFORM.with_suffix(".txt")
    assert audio.is_file() and text.is_file(), f"long-form test audio missing: {LONGFORM}.flac/.txt"
    return audio, text.read_text().strip()


@pytest.fixture(scope="session")
def language_clips() -> dict[str, Path]:
    """language code → 16 kHz FLAC of one synthesised sentence in that language (not English)."""
    clips = {lang: DATA / "languages" / f"{lang}.flac" for lang in LANGUAGES}
    missing = [str(path) for path in clips.values() if not path.is_file()]
    assert not missing, f"language test clips missing: {missing}"
    return clips


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository; only slow tests may use it, and they skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found (only needed for the larger, slow checks)")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    # the toy models' ops are tiny: a second OpenMP thread only adds synchronisation
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_random_whisper():
    """An enumerable random Whisper (vocabulary of V tokens) with a random LoRA adapter: the
    sampling tests compare against its exact, teacher-forced sequence probabilities."""
    from peft import get_peft_model
    from sampling_check import V
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from crosswhisper.dual_stream import StreamGate
    from crosswhisper.whisper import LORA

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
        max_source_positions=6, max_target_positions=16, pad_token_id=0, bos_token_id=0,
        eos_token_id=0, decoder_start_token_id=0,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # sharpen the random model so that P is far from uniform
        model.proj_out.weight.mul_(8.0)
    peft_model = get_peft_model(model, LORA.config(rank=4, alpha=64, random_init=True)).eval()
    encoder_states = torch.randn(1, 6, 16)
    return peft_model, StreamGate(peft_model), encoder_states

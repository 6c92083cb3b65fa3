from pathlib import Path

import pytest
import soundfile as sf
import torch

# ../shared/data beside the repository (CI checks out main with ../shared next to it)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "LibriSpeech"
TEST_CLEAN = DATA / "test-clean"


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
        pytest.fail(f"LibriSpeech test-clean not found at {TEST_CLEAN} (../shared/data must sit beside the repo)")
    items = librispeech_utterances(TEST_CLEAN)
    assert len(items) == 7
    return items


@pytest.fixture(scope="session")
def test_clean_audio(test_clean):
    """utterance id → 16 kHz float32 waveform."""
    return {utt: sf.read(path, dtype="float32")[0] for utt, path, _ in test_clean}


@pytest.fixture
def one_thread():
    # the toy models' ops are tiny: a second OpenMP thread only adds synchronisation
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

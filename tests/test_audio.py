"""Audio loading (crosswhisper/audio.py): every common container and codec opens through PyAV.

GitHub issue #16, point 5. The media in tests/data/media are one LibriSpeech utterance in several
formats (see its README.md); the acceptance test is that Whisper hears the same words in each.
"""

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from crosswhisper import transcribe
from crosswhisper.audio import SAMPLE_RATE, AudioError, load_audio

DATA = Path(__file__).parent / "data"
TEST_CLEAN = DATA / "LibriSpeech" / "test-clean"
MEDIA = DATA / "media"
WAV = MEDIA / "speech.wav"
ENCODED = ["speech.m4a", "speech.mp4", "speech.webm"]


def test_16k_mono_flac_is_bit_identical_to_soundfile():
    # the repository promises unchanged transcripts: the 16 kHz path must not touch the samples
    flacs = sorted(TEST_CLEAN.glob("*/*/*.flac"))
    assert len(flacs) == 7, TEST_CLEAN
    for flac in flacs:
        expected, rate = sf.read(flac, dtype="float32")
        assert rate == SAMPLE_RATE and expected.ndim == 1
        got = load_audio(flac)
        assert got.dtype == np.float32 and got.shape == expected.shape, flac.name
        assert np.array_equal(got, expected), flac.name


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_24", "PCM_32", "FLOAT"])
def test_other_16k_mono_sample_formats_match_soundfile(tmp_path, subtype):
    reference, _ = sf.read(WAV, dtype="float32")
    path = tmp_path / f"speech_{subtype}.{'flac' if subtype == 'PCM_24' else 'wav'}"
    sf.write(path, reference, SAMPLE_RATE, subtype=subtype)
    assert np.array_equal(load_audio(path), sf.read(path, dtype="float32")[0])


def test_media_are_what_the_readme_says():
    with av.open(str(MEDIA / "speech.mp4")) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]  # the video track comes first
    with av.open(str(MEDIA / "no_audio.mp4")) as container:
        assert [s.type for s in container.streams] == ["video"]
    assert sum(p.stat().st_size for p in MEDIA.iterdir()) < 1_000_000


@pytest.mark.parametrize("name", ENCODED)
def test_encoded_media_decode_to_16k_mono(name):
    reference = load_audio(WAV)
    audio = load_audio(MEDIA / name)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - len(reference)) <= 0.1 * SAMPLE_RATE
    assert np.isfinite(audio).all() and 0.1 < np.abs(audio).max() <= 1.0


@pytest.fixture(scope="module")
def wav_text():
    text = transcribe(WAV, model="tiny.en").text
    assert "wait no longer" in text.lower()  # "He could wait no longer."
    return text


@pytest.mark.parametrize("name", ENCODED)
def test_encoded_media_give_the_wav_transcript(name, wav_text):
    assert transcribe(MEDIA / name, model="tiny.en").text == wav_text


def test_video_without_audio_is_refused():
    with pytest.raises(AudioError, match="no_audio.mp4.*has no audio track"):
        load_audio(MEDIA / "no_audio.mp4")


def test_non_audio_missing_empty_and_directory(tmp_path):
    text_file = tmp_path / "notes.wav"
    text_file.write_text("this is not audio")
    with pytest.raises(AudioError, match="notes.wav"):
        load_audio(text_file)
    with pytest.raises(FileNotFoundError, match="nope.m4a"):
        load_audio(tmp_path / "nope.m4a")
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="empty.wav.*0 samples"):
        load_audio(empty)


@pytest.mark.parametrize("name,keep", [("speech.wav", 1000), ("speech.wav", 44), ("speech.webm", 5000), ("speech.m4a", 5000)])
def test_truncated_file_decodes_what_is_there_or_raises_audio_error(tmp_path, name, keep):
    # never an FFmpeg exception type (av.FFmpegError): either some samples or AudioError
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes((MEDIA / name).read_bytes()[:keep])
    full = len(load_audio(MEDIA / name))
    try:
        audio = load_audio(cut)
    except AudioError as error:
        assert cut.name in str(error)
    else:
        assert audio.dtype == np.float32 and audio.ndim == 1 and 0 < len(audio) < full


@pytest.mark.parametrize("rate", [44_100, SAMPLE_RATE])
def test_stereo_comes_back_mono_16k(tmp_path, rate):
    reference = load_audio(WAV)
    duration = len(reference) / SAMPLE_RATE
    t = np.arange(round(duration * rate)) / rate
    upsampled = np.interp(t, np.arange(len(reference)) / SAMPLE_RATE, reference).astype(np.float32)
    stereo = tmp_path / f"stereo{rate}.wav"
    sf.write(stereo, np.stack([upsampled, upsampled], axis=1), rate, subtype="FLOAT")
    audio = load_audio(stereo)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - len(reference)) <= 0.01 * SAMPLE_RATE
    n = min(len(audio), len(reference))
    assert np.corrcoef(audio[:n], reference[:n])[0, 1] > 0.99
    # the downmix averages the channels (FFmpeg's default would scale by √2 and could clip)
    assert np.abs(audio).max() == pytest.approx(np.abs(reference).max(), rel=0.05)


def test_array_passes_through():
    array = np.linspace(-0.5, 0.5, 1600, dtype=np.float32)
    assert np.array_equal(load_audio(array), array)

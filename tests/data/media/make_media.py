"""Recreate the test media of this folder from one LibriSpeech FLAC (see README.md).

    python tests/data/media/make_media.py path/to/1089-134691-0000.flac [--out DIR]

Writes speech.wav (16 kHz 16-bit PCM, the reference), speech.m4a (AAC), speech.mp4 (a small
mpeg4 video track first, then AAC audio), speech.webm (Opus) and no_audio.mp4 (video only).
Needs PyAV (`av`) and soundfile, both dependencies of crosswhisper.
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile as sf

RATE = 16_000
FPS = 5
SIDE = 64  # video frames are SIDE x SIDE pixels


def audio_frames(pcm: np.ndarray, size: int = 1024):
    """16-bit mono PCM → s16 AudioFrames with timestamps in 1/RATE units."""
    for start in range(0, len(pcm), size):
        frame = av.AudioFrame.from_ndarray(pcm[None, start : start + size], format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = start
        frame.time_base = Fraction(1, RATE)
        yield frame


def video_frames(seconds: float):
    """A moving colour gradient, enough frames to cover `seconds`."""
    ramp = np.linspace(0, 255, SIDE, dtype=np.float32)
    for i in range(int(np.ceil(seconds * FPS))):
        rgb = np.empty((SIDE, SIDE, 3), dtype=np.uint8)
        rgb[..., 0] = (ramp[None, :] + 20 * i) % 256
        rgb[..., 1] = ramp[:, None]
        rgb[..., 2] = 128
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = i
        frame.time_base = Fraction(1, FPS)
        yield frame


def write(path: Path, pcm: np.ndarray | None, audio_codec: str | None = None, audio_rate: int = RATE,
          audio_bit_rate: int = 0, video_seconds: float | None = None) -> None:
    # bitexact: no random UIDs or version strings, so that a rerun gives the same bytes
    with av.open(str(path), "w", container_options={"fflags": "+bitexact"}) as container:
        streams = []
        if video_seconds is not None:  # added first: the video stream has index 0
            video = container.add_stream("mpeg4", rate=FPS)
            video.width = video.height = SIDE
            video.pix_fmt = "yuv420p"
            video.bit_rate = 20_000
            streams.append((video, video_frames(video_seconds)))
        if pcm is not None:
            audio = container.add_stream(audio_codec, rate=audio_rate, layout="mono")
            if audio_bit_rate:
                audio.bit_rate = audio_bit_rate
            streams.append((audio, audio_frames(pcm)))
        for stream, frames in streams:
            for frame in frames:
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))  # flush the encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flac", type=Path, help="a 16 kHz mono LibriSpeech utterance")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()

    pcm, rate = sf.read(args.flac, dtype="int16")
    assert rate == RATE and pcm.ndim == 1, "expected a 16 kHz mono file"
    seconds = len(pcm) / RATE
    args.out.mkdir(parents=True, exist_ok=True)

    sf.write(args.out / "speech.wav", pcm, RATE, subtype="PCM_16")
    write(args.out / "speech.m4a", pcm, "aac", audio_bit_rate=48_000)
    write(args.out / "speech.mp4", pcm, "aac", audio_bit_rate=48_000, video_seconds=seconds)
    write(args.out / "speech.webm", pcm, "libopus", audio_rate=48_000, audio_bit_rate=32_000)
    write(args.out / "no_audio.mp4", None, video_seconds=seconds)
    for name in ("speech.wav", "speech.m4a", "speech.mp4", "speech.webm", "no_audio.mp4"):
        print(f"{args.out / name}: {(args.out / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()

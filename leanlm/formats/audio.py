"""Audio in: a file path or bytes -> mono float32 samples at 16 kHz.

wav, flac and ogg decode through soundfile (libsndfile); anything else (mp3, m4a, webm...) through the ffmpeg
program when it is installed. Resampling uses soxr (libsoxr, the resampler of SoX). Both libraries are the
`audio` extra: `pip install leanlm[audio]`.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np

from leanlm.errors import InvalidRequestError, LeanLMError

TARGET_RATE = 16_000


class AudioError(InvalidRequestError):
    """Audio that cannot be decoded (a bad file, an unknown format, no ffmpeg for it)."""


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise LeanLMError(
            f"Reading audio needs the Python package {module!r}, which is not installed: pip install leanlm[audio]"
        ) from exc


def load_audio(source: str | Path | bytes, sample_rate: int = TARGET_RATE) -> np.ndarray:
    """Decode `source` (a path, or the bytes of a file) to mono float32 in [-1, 1] at `sample_rate`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "the uploaded audio"
        if not data:
            raise AudioError("The audio is empty (0 bytes): send a wav, flac, ogg or mp3 file.")
    else:
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"Audio file {path} does not exist.")
        data, name = path.read_bytes(), str(path)
    samples, rate = _decode_soundfile(data)
    if samples is None:
        samples, rate = _decode_ffmpeg(data, name, sample_rate)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if samples.size == 0:
        raise AudioError(f"{name} holds no audio samples.")
    return resample(samples, rate, sample_rate)


def resample(samples: np.ndarray, rate: int, target: int = TARGET_RATE) -> np.ndarray:
    if rate == target:
        return samples
    soxr = _require("soxr")
    return np.asarray(soxr.resample(samples, rate, target, quality="HQ"), dtype=np.float32)


def _decode_soundfile(data: bytes) -> tuple[np.ndarray | None, int]:
    soundfile = _require("soundfile")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except (soundfile.LibsndfileError, RuntimeError, TypeError):
        return None, 0  # a format libsndfile does not read: try ffmpeg
    return samples, rate


def _decode_ffmpeg(data: bytes, name: str, sample_rate: int) -> tuple[np.ndarray, int]:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(
            f"{name} is not wav, flac or ogg, and decoding other formats (mp3, m4a, webm...) needs the ffmpeg "
            "program, which is not installed (apt-get install ffmpeg, brew install ffmpeg). Or convert it to wav."
        )
    command = [
        ffmpeg,
        "-nostdin",
        "-loglevel",
        "error",
        "-i",
        "pipe:0",
        "-f",
        "f32le",
        "-ac",
        "1",
        "-ar",
        str(sample_rate),
        "pipe:1",
    ]
    result = subprocess.run(command, input=data, capture_output=True)
    if result.returncode != 0:
        reason = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["unknown error"]
        raise AudioError(f"{name} could not be decoded as audio (ffmpeg: {reason[0]}).")
    return np.frombuffer(result.stdout, dtype=np.float32).copy(), sample_rate

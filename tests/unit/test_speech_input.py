"""Audio input, the CTranslate2 model.bin reader on hand-written files, and the window-splitting rule."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from leanlm.errors import ModelFormatError
from leanlm.formats.audio import AudioError, load_audio
from leanlm.formats.ctranslate2 import read_model_bin
from leanlm.speech.transcribe import split_by_timestamps

soundfile = pytest.importorskip("soundfile")


def _string(text: str) -> bytes:
    return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"


def _model_bin(version: int = 6) -> bytes:
    weight = np.arange(6, dtype=np.float16).reshape(2, 3)
    body = struct.pack("<I", version) + _string("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", 2)
    body += _string("a/weight") + struct.pack("<B", 2) + struct.pack("<II", 2, 3) + struct.pack("<B", 4)
    body += struct.pack("<I", weight.nbytes) + weight.tobytes()
    body += _string("a/heads") + struct.pack("<B", 0) + struct.pack("<B", 2) + struct.pack("<I", 2)
    body += struct.pack("<h", 8)
    body += struct.pack("<I", 1) + _string("b/weight") + _string("a/weight")
    return body


def test_model_bin_reader_reads_shapes_dtypes_scalars_and_aliases(tmp_path):
    (tmp_path / "model.bin").write_bytes(_model_bin())
    model = read_model_bin(tmp_path)
    assert model.name == "WhisperSpec" and model.revision == 3
    weight = model.variables["a/weight"]
    assert weight.dtype == torch.float16 and weight.shape == (2, 3) and weight[1, 2].item() == 5.0
    assert model.scalar("a/heads") == 8
    assert model.variables["b/weight"] is weight


def test_model_bin_reader_names_truncation_and_foreign_files(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(_model_bin()[:40])
    with pytest.raises(ModelFormatError, match="truncated"):
        read_model_bin(path)
    path.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelFormatError, match="binary version"):
        read_model_bin(path)


def _wav_bytes(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt)
    return buffer.getvalue()


def test_audio_from_bytes_and_file_is_mono_16k(tmp_path):
    t = np.arange(44_100) / 44_100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1).astype(np.float32) * 0.5
    samples = load_audio(_wav_bytes(stereo, 44_100, "FLAC"))
    assert samples.dtype == np.float32 and samples.ndim == 1 and abs(len(samples) - 16_000) <= 1
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 s of audio: bin index = Hz; the tone survives resampling
    (tmp_path / "a.ogg").write_bytes(_wav_bytes(stereo, 44_100, "OGG"))
    assert abs(len(load_audio(tmp_path / "a.ogg")) - 16_000) <= 1


def test_bad_audio_errors_name_the_problem(monkeypatch, tmp_path):
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"")
    with pytest.raises(AudioError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(AudioError, match="ffmpeg"):
        load_audio(b"ID3 this is not audio at all")


def test_garbage_through_ffmpeg_is_an_audio_error():
    import shutil

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    with pytest.raises(AudioError, match="could not be decoded"):
        load_audio(b"not audio " * 100)


B = 50364  # timestamp_begin of multilingual Whisper


def test_split_at_timestamp_pairs_and_seek_to_last_complete_timestamp():
    # <0.00> a b <1.00><1.00> c <2.00><2.00> d (unfinished): two segments, seek to 2.00 s = frame 200.
    tokens = [B, 1, 2, B + 50, B + 50, 3, B + 100, B + 100, 4]
    pieces, seek = split_by_timestamps(tokens, B, seek=0, size=3000, time_offset=0.0)
    assert [(s, e, t) for s, e, t in pieces] == [(0.0, 1.0, [B, 1, 2, B + 50]), (1.0, 2.0, [B + 50, 3, B + 100])]
    assert seek == 200


def test_single_timestamp_ending_consumes_the_window():
    tokens = [B, 1, B + 50, B + 50, 2, B + 150]
    pieces, seek = split_by_timestamps(tokens, B, seek=3000, size=1234, time_offset=30.0)
    assert [(s, e) for s, e, _ in pieces] == [(30.0, 31.0), (31.0, 33.0)]
    assert seek == 3000 + 1234


def test_no_pair_gives_one_segment_up_to_the_last_timestamp():
    pieces, seek = split_by_timestamps([B, 1, 2, B + 75], B, seek=0, size=500, time_offset=0.0)
    assert pieces == [(0.0, 1.5, [B, 1, 2, B + 75])] and seek == 500


def test_mp3_decodes_through_ffmpeg(tmp_path):
    import shutil
    import subprocess

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    clip = Path(__file__).resolve().parents[1] / "fixtures" / "audio" / "en.wav"
    mp3 = tmp_path / "en.mp3"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(clip), str(mp3)], check=True)
    wav, decoded = load_audio(clip), load_audio(mp3.read_bytes())
    assert abs(len(decoded) - len(wav)) < 2000  # mp3 frames pad the end
    assert np.abs(decoded).max() > 0.05

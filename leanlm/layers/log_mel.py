"""Whisper's audio frontend in torch: 16 kHz samples -> normalized log-mel frames (10 ms hop, 25 ms window).

The same computation as openai-whisper's `log_mel_spectrogram` and faster-whisper's FeatureExtractor: a periodic
Hann window, a centred reflect-padded STFT (n_fft 400, hop 160), power spectrum without the last frame, Slaney
mel filters, log10 clamped at 1e-10, floored 8 decades under the maximum, then (x + 4) / 4.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # one 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames per window
SECONDS_PER_FRAME = HOP_LENGTH / SAMPLE_RATE


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """The Slaney mel scale (librosa's default): linear under 1 kHz, logarithmic above."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    freq = np.asarray(freq, dtype=np.float64)
    linear = freq / f_sp
    return np.where(freq >= min_log_hz, min_log_mel + np.log(np.maximum(freq, 1e-10) / min_log_hz) / logstep, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


@functools.lru_cache(maxsize=4)
def mel_filters(n_mels: int = 80, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters with Slaney area normalization."""
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_points = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2)
    hz_points = _mel_to_hz(mel_points)
    widths = np.diff(hz_points)
    ramps = hz_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_points[2:] - hz_points[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


def log_mel_spectrogram(audio: torch.Tensor | np.ndarray, n_mels: int = 80, padding: int = 0) -> torch.Tensor:
    """(samples,) float audio at 16 kHz -> (n_mels, frames) with frames = (samples + padding) // 160 + 1 - 1."""
    audio = torch.as_tensor(audio, dtype=torch.float32)
    if audio.ndim != 1:
        raise ValueError(f"log_mel_spectrogram takes mono audio as one dimension, got shape {tuple(audio.shape)}")
    if padding:
        audio = torch.nn.functional.pad(audio, (0, padding))
    window = torch.hann_window(N_FFT)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = mel_filters(n_mels) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def pad_or_trim_frames(mel: torch.Tensor, frames: int = N_FRAMES) -> torch.Tensor:
    """Cut or zero-pad the last axis to `frames` (the encoder always sees a whole 30 s window)."""
    length = mel.shape[-1]
    if length > frames:
        return mel[..., :frames]
    if length < frames:
        return torch.nn.functional.pad(mel, (0, frames - length))
    return mel

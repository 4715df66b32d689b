"""Rotary position embeddings (rotate-half convention) and the rope scaling variants of config.json."""

from __future__ import annotations

import math
from typing import Any

import torch

from leanlm.errors import ModelFormatError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, context_length: int, max_positions: int
) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies (head_dim/2,) in float32 and the attention scale yarn applies to cos/sin.

    Always built on the CPU (explicit device), even while a model is constructed under torch.device("meta").
    """
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return base.float(), 1.0
    factor = float(scaling.get("factor", 1.0))
    original = int(scaling.get("original_max_position_embeddings", context_length))
    if rope_type == "linear":
        return (base / factor).float(), 1.0
    if rope_type == "dynamic":
        # NTK-aware: only stretch when the sequence outgrows the trained context (sized once, for the cache length).
        if max_positions <= original:
            return base.float(), 1.0
        theta = theta * ((factor * max_positions / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return (
            1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
        ).float(), 1.0
    if rope_type == "llama3":
        return _llama3(base, scaling, factor, original).float(), 1.0
    if rope_type == "yarn":
        return _yarn(base, head_dim, theta, scaling, factor, original)
    raise ModelFormatError(
        f"rope_scaling type '{rope_type}' is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}). "
        "Remove rope_scaling from config.json to run with the trained context only."
    )


def _llama3(base: torch.Tensor, scaling: dict[str, Any], factor: float, original: int) -> torch.Tensor:
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    wavelength = 2 * math.pi / base
    low_freq_wavelen = original / low_freq_factor
    high_freq_wavelen = original / high_freq_factor
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
    scaled = torch.where(wavelength > low_freq_wavelen, base / factor, base)
    smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelength >= high_freq_wavelen) & (wavelength <= low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


def _yarn(
    base: torch.Tensor, head_dim: int, theta: float, scaling: dict[str, Any], factor: float, original: int
) -> tuple[torch.Tensor, float]:
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)
    mscale = scaling.get("attention_factor")
    if mscale is None:
        mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = math.floor(correction_dim(beta_fast)) if scaling.get("truncate", True) else correction_dim(beta_fast)
    high = math.ceil(correction_dim(beta_slow)) if scaling.get("truncate", True) else correction_dim(beta_slow)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 keeps the original frequency, 0 interpolates it by `factor`
    inv = (base / factor) * (1 - extrapolation) + base * extrapolation
    return inv.float(), float(mscale)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, head_dim). Rotates each (i, i + head_dim/2) pair by its position's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin

"""GGUF K-quant block encoders (Q4_K, Q6_K) for `--export-gguf ... --gguf-type q4_k_m`: the reverse of
formats/gguf_blocks.py's decoders, which the tests hold them to bit for bit.

Both round the (dequantized) weights onto the block's own grid, so a GPTQ/AWQ result keeps its values up to the
K-quant's 6-bit or 8-bit sub-block scales:
  Q4_K: super-blocks of 256 = 8 x 32; W = d*sc * q - dmin*m, q in 0..15, sc and m 6-bit, d and dmin float16
  Q6_K: super-blocks of 256 = 16 x 16; W = d*sc * (q - 32), q in 0..63, sc int8, d float16
The row width must be a multiple of 256 (llama.cpp's rule too); the caller picks another type otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

SUPER = 256


def _half(values: torch.Tensor) -> torch.Tensor:
    """float16-rounded values (what the file holds), as float32."""
    return values.half().float()


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / torch.where(b > 0, b, 1.0), 0.0)


def encode_q4_k(weight: torch.Tensor) -> np.ndarray:
    """(rows, cols) float -> (rows, cols / 256 * 144) uint8 Q4_K blocks."""
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // SUPER, 8, 32)
    low = w.amin(-1).clamp(max=0.0)  # the block stores -dmin*m <= 0 as each sub-block's minimum
    scale = (w.amax(-1) - low) / 15
    d = _half(scale.amax(-1) / 63)  # (rows, supers)
    dmin = _half((-low).amax(-1) / 63)
    sc = _safe_div(scale, d[..., None]).round().clamp(0, 63)
    m = _safe_div(-low, dmin[..., None]).round().clamp(0, 63)
    step = (d[..., None] * sc)[..., None]
    q = _safe_div(w + (dmin[..., None] * m)[..., None], step).round().clamp(0, 15).to(torch.uint8)
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    scales = torch.cat(
        [
            sc[..., :4] | ((sc[..., 4:] >> 4) << 6),
            m[..., :4] | ((m[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4),
        ],
        dim=-1,
    )  # (rows, supers, 12)
    pairs = q.reshape(rows, cols // SUPER, 4, 2, 32)  # sub-blocks 2j (low nibbles) and 2j + 1 (high) share bytes
    qs = (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).reshape(rows, cols // SUPER, 128)
    halves = torch.stack([d, dmin], dim=-1).half().view(torch.uint8)  # (rows, supers, 4)
    return torch.cat([halves, scales, qs], dim=-1).reshape(rows, -1).numpy()


def encode_q6_k(weight: torch.Tensor) -> np.ndarray:
    """(rows, cols) float -> (rows, cols / 256 * 210) uint8 Q6_K blocks."""
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // SUPER, 16, 16)
    scale = w.abs().amax(-1) / 31  # q - 32 in [-31, 31]: symmetric, as the int8 sub-block scale is
    d = _half(scale.amax(-1) / 127)
    sc = _safe_div(scale, d[..., None]).round().clamp(-128, 127)
    step = (d[..., None] * sc)[..., None]
    q = (_safe_div(w, step).round().clamp(-32, 31) + 32).to(torch.uint8).reshape(rows, cols // SUPER, 2, 4, 32)
    # Each half of 128: quarters 0 and 2 share the first 32 low-nibble bytes, 1 and 3 the next 32; the 2 high bits
    # of all four quarters share one byte.
    ql = torch.cat(
        [q[..., 0, :] & 0x0F | (q[..., 2, :] & 0x0F) << 4, q[..., 1, :] & 0x0F | (q[..., 3, :] & 0x0F) << 4], -1
    )
    qh = (q[..., 0, :] >> 4) | (q[..., 1, :] >> 4) << 2 | (q[..., 2, :] >> 4) << 4 | (q[..., 3, :] >> 4) << 6
    supers = cols // SUPER
    parts = [
        ql.reshape(rows, supers, 128),
        qh.reshape(rows, supers, 64),
        sc.to(torch.int8).view(torch.uint8),
        d[..., None].half().view(torch.uint8),
    ]
    return torch.cat(parts, dim=-1).reshape(rows, -1).numpy()

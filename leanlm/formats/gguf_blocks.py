"""GGUF's quantized blocks as QuantizedTensors (W = codes * scale + offset), without re-quantization.

Legacy blocks of 32 weights:
  Q8_0: fp16 d, 32 x int8 q                       -> W = q * d
  Q4_0: fp16 d, 16 bytes of nibbles               -> W = (q - 8) * d
  Q4_1: fp16 d, fp16 m, 16 bytes                  -> W = q * d + m
  Q5_0: fp16 d, 4 bytes of 5th bits, 16 bytes     -> W = (q - 16) * d
  Q5_1: fp16 d, fp16 m, 4 bytes, 16 bytes         -> W = q * d + m
  Nibbles: byte j holds element j in its low half and element j + 16 in its high half; bit j of the 5th-bit
  word belongs to element j.
K-quant super-blocks of 256 weights (llama.cpp's ggml-quants):
  Q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit (sc, m) x 8, 128 bytes -> W = d*sc * q - dmin*m, per 32
  Q5_K: like Q4_K plus 32 bytes of 5th bits                        -> the same with 5-bit q
  Q6_K: 128 bytes low nibbles, 64 bytes high 2 bits, 16 x int8 sc, fp16 d -> W = d*sc * (q - 32), per 16
d*sc and dmin*m are exact in float32 (11 + 8 significant bits), so scale = d*sc and offset = -dmin*m reproduce
the gguf package's float32 arithmetic bit for bit. Codes are uint8 for 4-bit types (leanlm's q4 kernels) and
int8 otherwise (its q8 kernels); Q6_K keeps its 16-weight sub-blocks as group_size 16.
"""

from __future__ import annotations

import numpy as np
import torch

from leanlm.layers.quantized_tensor import QuantizedTensor

BLOCK = 32
SUPER = 256
NATIVE_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def blocks_to_quantized(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedTensor:
    """raw: the tensor's bytes (rows, bytes per row) as stored in the file."""
    if type_name not in NATIVE_TYPES:
        raise ValueError(f"{type_name} is not a native block type ({', '.join(NATIVE_TYPES)})")
    rows, cols = shape
    if type_name.endswith("_K"):
        return _k_quant(np.ascontiguousarray(raw).reshape(rows, cols // SUPER, -1), type_name, rows, cols)
    groups = cols // BLOCK
    blocks = torch.from_numpy(raw.copy()).view(rows, groups, -1)  # copy: the file map is read-only
    d = _halves(blocks[..., 0:2]).view(rows, groups)
    if type_name == "Q8_0":
        codes = blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, cols)
        return QuantizedTensor(codes, d, None, 8, BLOCK)
    if type_name == "Q4_0":
        return QuantizedTensor(_nibbles(blocks[..., 2:], rows, cols), d, -8 * d, 4, BLOCK)
    if type_name == "Q4_1":
        m = _halves(blocks[..., 2:4]).view(rows, groups)
        return QuantizedTensor(_nibbles(blocks[..., 4:], rows, cols), d, m, 4, BLOCK)
    has_min = type_name == "Q5_1"
    start = 4 if has_min else 2
    high = _bits(blocks[..., start : start + 4].numpy(), 1, 32).reshape(rows, cols)
    codes = (_nibbles(blocks[..., start + 4 :], rows, cols) | (high << 4)).view(torch.int8)
    if has_min:
        return QuantizedTensor(codes, d, _halves(blocks[..., 2:4]).view(rows, groups), 5, BLOCK)
    return QuantizedTensor(codes - 16, d, None, 5, BLOCK)


def _k_quant(blocks: np.ndarray, type_name: str, rows: int, cols: int) -> QuantizedTensor:
    """blocks: (rows, super-blocks, bytes per super-block)."""
    if type_name == "Q6_K":
        low = _nibble_pairs(blocks[..., :128], 64)  # (rows, supers, 256): halves of 128 as 2 x (low, high) x 64
        high = _bits(blocks[..., 128:192].reshape(*blocks.shape[:2], 2, 32), 2, 4)  # (rows, supers, 2, 128)
        q = low.astype(np.int16) | (high.reshape(low.shape).astype(np.int16) << 4)
        codes = torch.from_numpy((q - 32).astype(np.int8)).reshape(rows, cols)
        sub_scales = torch.from_numpy(blocks[..., 192:208].copy().view(np.int8)).float()  # (rows, supers, 16)
        d = _halves(torch.from_numpy(blocks[..., 208:210].copy()))[..., None]
        return QuantizedTensor(codes, (d * sub_scales).reshape(rows, -1), None, 6, 16, d.reshape(rows, -1))
    d, dmin = (_halves(torch.from_numpy(blocks[..., i : i + 2].copy()))[..., None] for i in (0, 2))
    sc, m = _scales_and_mins(blocks[..., 4:16])  # (rows, supers, 8) each
    scale, offset = (d * sc).reshape(rows, -1), -(dmin * m).reshape(rows, -1)
    bases = (d.reshape(rows, -1), -dmin.reshape(rows, -1))
    if type_name == "Q4_K":
        codes = torch.from_numpy(_nibble_pairs(blocks[..., 16:144], 32)).reshape(rows, cols)
        return QuantizedTensor(codes, scale, offset, 4, BLOCK, *bases)
    high = _bits(blocks[..., 16:48], 1, 8).reshape(*blocks.shape[:2], SUPER)  # bit i of byte j: element 32 i + j
    low = _nibble_pairs(blocks[..., 48:176], 32)
    codes = torch.from_numpy((low | (high << 4)).view(np.int8)).reshape(rows, cols)
    return QuantizedTensor(codes, scale, offset, 5, BLOCK, *bases)


def _halves(raw: torch.Tensor) -> torch.Tensor:
    """(..., 2) bytes -> (...) float32 from float16."""
    return raw.contiguous().view(torch.float16).float().squeeze(-1)


def _nibbles(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4  # (rows, groups, 16) each
    return torch.cat([low, high], dim=-1).reshape(rows, cols)


def _nibble_pairs(packed: np.ndarray, run: int) -> np.ndarray:
    """K-quant nibbles: each run of `run` bytes holds `run` elements in its low halves, then `run` in its high."""
    chunks = packed.reshape(*packed.shape[:-1], -1, 1, run)
    return ((chunks >> np.array([0, 4], np.uint8).reshape(2, 1)) & 0x0F).reshape(*packed.shape[:-1], -1)


def _bits(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    """Fields of `width` bits: (..., n) bytes -> (..., count, n), field k of byte j at shift k * width. A 4-byte
    word (Q5_0/Q5_1's 5th bits) is read as one little-endian uint32 of 32 one-bit fields."""
    if packed.shape[-1] == 4 and count == 32:
        word = packed.copy().view("<u4")  # (..., 1)
        fields = (word >> np.arange(32, dtype=np.uint32)) & 1
        return torch.from_numpy(fields.astype(np.uint8))
    shifts = (np.arange(count, dtype=np.uint8) * width).reshape(count, 1)
    return (packed[..., None, :] >> shifts) & np.uint8((1 << width) - 1)


def _scales_and_mins(packed: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins: bytes 0-3 hold scales 0-3 (low 6 bits) and
    the top 2 bits of scales 4-7; bytes 4-7 the same for mins; bytes 8-11 the low 4 bits of scales/mins 4-7."""
    scales, mins, lows = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([scales & 0x3F, (lows & 0x0F) | ((scales >> 2) & 0x30)], axis=-1)
    m = np.concatenate([mins & 0x3F, (lows >> 4) | ((mins >> 2) & 0x30)], axis=-1)
    return torch.from_numpy(sc.astype(np.float32)), torch.from_numpy(m.astype(np.float32))

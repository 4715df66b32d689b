"""GGUF's Q8_0, Q4_0 and Q4_1 blocks (32 weights each) as QuantizedTensors, without re-quantization.

Q8_0: fp16 d, 32 x int8 q            -> W = q * d
Q4_0: fp16 d, 16 bytes of nibbles    -> W = (q - 8) * d
Q4_1: fp16 d, fp16 m, 16 bytes       -> W = q * d + m
Nibbles: byte j holds element j in its low half and element j + 16 in its high half.
"""

from __future__ import annotations

import numpy as np
import torch

from leanlm.layers.quantized_tensor import QuantizedTensor

BLOCK = 32
NATIVE_TYPES = ("Q8_0", "Q4_0", "Q4_1")


def blocks_to_quantized(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedTensor:
    """raw: the tensor's bytes (rows, bytes per row) as stored in the file."""
    rows, cols = shape
    groups = cols // BLOCK
    blocks = torch.from_numpy(raw.copy()).view(rows, groups, -1)  # copy: the file map is read-only
    d = blocks[..., 0:2].contiguous().view(torch.float16).float().view(rows, groups)
    if type_name == "Q8_0":
        codes = blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, cols)
        return QuantizedTensor(codes, d, None, 8, BLOCK)
    if type_name == "Q4_0":
        codes, offset = _nibbles(blocks[..., 2:], rows, cols), -8 * d
    elif type_name == "Q4_1":
        codes = _nibbles(blocks[..., 4:], rows, cols)
        offset = blocks[..., 2:4].contiguous().view(torch.float16).float().view(rows, groups)
    else:
        raise ValueError(f"{type_name} is not a native block type ({', '.join(NATIVE_TYPES)})")
    return QuantizedTensor(codes, d, offset, 4, BLOCK)


def _nibbles(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4  # (rows, groups, 16) each
    return torch.cat([low, high], dim=-1).reshape(rows, cols)

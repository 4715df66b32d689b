"""Repack a QuantizedTensor into the layout leanlm's C++ kernels read (see csrc/quant_linear.cpp).

Rows are taken 8 at a time (padded with zero rows) and interleaved 4 inputs at a time, so that one 32-byte load
holds 4 inputs of 8 rows; scales and offsets are stored 8 per block (one per row), as float16 when that is
exact (GGUF blocks always are) and float32 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from leanlm.layers.quantized_tensor import QuantizedTensor

BLOCK = 32
ROWS = 8


@dataclass
class KernelWeight:
    codes: torch.Tensor  # (groups, blocks, 128) for q4, (groups, blocks, 256) for q8; uint8
    scales: torch.Tensor  # (groups, blocks, 8) float16, or float32 when float16 would round them
    offsets: torch.Tensor | None
    rows: int
    q4: bool

    def nbytes(self) -> int:
        tensors = [self.codes, self.scales] + ([self.offsets] if self.offsets is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def kernel_format(weight: QuantizedTensor) -> str | None:
    """'q4' or 'q8' when the kernels can run this weight, else None (the caller keeps the torch path)."""
    columns = weight.codes.shape[1]
    if columns % BLOCK or weight.group_size % BLOCK:
        return None
    if weight.bits <= 4 and weight.codes.dtype == torch.uint8:
        return "q4"
    if weight.bits == 8 and weight.codes.dtype == torch.int8 and weight.offset is None:
        return "q8"
    return None


def fits_float16(params: torch.Tensor) -> bool:
    """Whether float16 holds these parameters exactly (GGUF's always do; leanlm's own are float32)."""
    return bool(torch.equal(params.half().float(), params.float()))


def pack(weight: QuantizedTensor) -> KernelWeight:
    kind = kernel_format(weight)
    if kind is None:
        raise ValueError(f"bits={weight.bits}, group={weight.group_size} has no kernel layout")
    rows, columns = weight.codes.shape
    groups, blocks = -(-rows // ROWS), columns // BLOCK
    pad = groups * ROWS - rows
    codes = F.pad(weight.codes, (0, 0, 0, pad)).view(groups, ROWS, blocks, BLOCK).transpose(1, 2)  # (G, B, 8, 32)
    if kind == "q4":
        nibbles = codes[..., :16] | (codes[..., 16:] << 4)  # byte e: input e low, input 16 + e high
        slabs = nibbles.reshape(groups, blocks, ROWS, 4, 4).transpose(2, 3)  # (G, B, slab, row, 4 inputs)
    else:
        slabs = codes.view(torch.uint8).reshape(groups, blocks, ROWS, 8, 4).transpose(2, 3)
    packed = slabs.reshape(groups, blocks, -1).contiguous()

    def per_row(params: torch.Tensor) -> torch.Tensor:
        per_block = weight.per_column(params, BLOCK)  # (N, blocks)
        return F.pad(per_block, (0, 0, 0, pad)).view(groups, ROWS, blocks).transpose(1, 2).contiguous().to(dtype)

    params = [weight.scale] + ([weight.offset] if weight.offset is not None else [])
    dtype = torch.float16 if all(fits_float16(p) for p in params) else torch.float32
    offsets = per_row(weight.offset) if weight.offset is not None else None
    return KernelWeight(packed, per_row(weight.scale), offsets, rows, kind == "q4")

"""Repack a QuantizedTensor into the layout leanlm's C++ kernels read (see csrc/quant_linear.cpp).

Rows are taken 8 at a time (padded with zero rows) and interleaved 4 inputs at a time, so that one 32-byte load
holds 4 inputs of 8 rows; scales and offsets are stored 8 per block (one per row), as float16 when that is
exact (GGUF's legacy blocks always are) and float32 otherwise (K-quant scales d * sc, leanlm's own).
A q8 weight with groups of 16 (GGUF's Q6_K) stores two scales per block: 8 for inputs 0-15, then 8 for 16-31.
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
    scales: torch.Tensor  # (groups, blocks, 8) float16, or float32 when float16 would round them; (.., 16): sub16
    offsets: torch.Tensor | None  # (groups, blocks, 8), in the scales' dtype
    rows: int
    q4: bool

    def nbytes(self) -> int:
        tensors = [self.codes, self.scales] + ([self.offsets] if self.offsets is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def kernel_format(weight: QuantizedTensor) -> str | None:
    """'q4' or 'q8' when the kernels can run this weight, else None (the caller keeps the torch path).
    q4: unsigned codes of up to 4 bits; q8: int8 codes (GGUF's 5- and 6-bit codes too), with or without offsets,
    groups of 32 or more, or of 16 (two scales per block) when each pair of groups shares its offset."""
    columns = weight.codes.shape[1]
    if columns % BLOCK or not (weight.group_size % BLOCK == 0 or _sub16(weight)):
        return None
    if weight.bits <= 4 and weight.codes.dtype == torch.uint8 and weight.group_size % BLOCK == 0:
        return "q4"
    if weight.bits <= 8 and weight.codes.dtype == torch.int8:
        return "q8"
    return None


def _sub16(weight: QuantizedTensor) -> bool:
    """Groups of 16 whose offsets (if any) are equal in each block of 32: the kernels' two-scale blocks."""
    if weight.group_size != 16:
        return False
    return weight.offset is None or bool(torch.equal(weight.offset[:, 0::2], weight.offset[:, 1::2]))


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

    def per_row(per_group: torch.Tensor) -> torch.Tensor:
        """(N, blocks * halves) parameters -> (groups, blocks, halves * 8): a block's 8 rows, half after half."""
        halves = per_group.shape[1] // blocks
        padded = F.pad(per_group, (0, 0, 0, pad)).view(groups, ROWS, blocks, halves)
        return padded.permute(0, 2, 3, 1).reshape(groups, blocks, halves * ROWS).contiguous().to(dtype)

    params = [weight.scale] + ([weight.offset] if weight.offset is not None else [])
    dtype = torch.float16 if all(fits_float16(p) for p in params) else torch.float32
    if weight.group_size == 16:  # sub16: one offset per block (equal over its two groups: kernel_format checks)
        offsets = per_row(weight.offset[:, 0::2]) if weight.offset is not None else None
        return KernelWeight(packed, per_row(weight.scale), offsets, rows, False)
    offsets = per_row(weight.per_column(weight.offset, BLOCK)) if weight.offset is not None else None
    return KernelWeight(packed, per_row(weight.per_column(weight.scale, BLOCK)), offsets, rows, kind == "q4")

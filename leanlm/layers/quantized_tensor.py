"""QuantizedTensor: a weight matrix stored as integer codes with group-wise scale and offset, the form every
quantized source (GGUF blocks, RTN, GPTQ, AWQ) becomes. layers/quantized_linear.py runs it; kernels/layout.py
repacks it for leanlm's kernels. Its own module so that both read it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def expand_groups(params: torch.Tensor, group_size: int, columns: int, group: int = 1) -> torch.Tensor:
    """(N, ceil(K / group_size)) parameters -> (N, K / group): each repeated over its columns, tail cut."""
    return params.repeat_interleave(group_size // group, dim=1)[:, : columns // group]


@dataclass
class QuantizedTensor:
    """W[n, k] = codes[n, k] * scale[n, k // group_size] + offset[n, k // group_size].

    The last group of a row may be shorter (576 inputs in groups of 128: four of 128 and one of 64)."""

    codes: torch.Tensor  # (N, K) uint8 for unsigned codes (0..2^bits-1), int8 for symmetric int8
    scale: torch.Tensor  # (N, ceil(K / group_size)) float32
    offset: torch.Tensor | None  # like scale; None = symmetric (no offset)
    bits: int
    group_size: int
    # GGUF K-quants: scale (and offset) = an integer multiplier (|m| <= 127) * a float16 base per 256 inputs,
    # (N, K / 256) float32; leanlm's kernels then read one byte per group instead of a float (kernels/layout.py).
    scale_base: torch.Tensor | None = None
    offset_base: torch.Tensor | None = None

    def per_column(self, params: torch.Tensor, group: int = 1) -> torch.Tensor:
        """Group parameters repeated to one per column (or per `group` columns): (N, K / group)."""
        return expand_groups(params, self.group_size, self.codes.shape[1], group)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        weight = self.codes.to(torch.float32) * self.per_column(self.scale)
        if self.offset is not None:
            weight = weight + self.per_column(self.offset)
        return weight.to(dtype)

    def storage_bytes(self) -> int:
        """Bytes this tensor needs when packed (codes at `bits` each, scale and offset as float16)."""
        per_group = 2 * (1 + (self.offset is not None))
        return self.codes.numel() * self.bits // 8 + self.scale.numel() * per_group

    def map_rows(self, fn) -> QuantizedTensor:
        """Apply the same row operation (e.g. a permutation) to codes, scale and offset."""
        offset = None if self.offset is None else fn(self.offset)
        bases = [None if b is None else fn(b) for b in (self.scale_base, self.offset_base)]
        return QuantizedTensor(fn(self.codes), fn(self.scale), offset, self.bits, self.group_size, *bases)

    @staticmethod
    def cat(parts: list[QuantizedTensor]) -> QuantizedTensor:
        """Stack row blocks (q, k, v into qkv). Parts stored differently (a GGUF Q4_K_M file's Q4_K and Q6_K) are
        first re-expressed exactly in one form (common_form); ValueError when there is none."""
        parts = QuantizedTensor.common_form(parts)
        if parts is None:
            raise ValueError("these quantized tensors have no common exact form; dequantize them to stack them")
        first = parts[0]
        offsets = None if first.offset is None else torch.cat([p.offset for p in parts])
        bases = [None, None]
        if all(p.scale_base is not None for p in parts):  # every part a K-quant: the bases stack too
            bases[0] = torch.cat([p.scale_base for p in parts])
            if offsets is not None:
                bases[1] = torch.cat([p.offset_base if p.offset_base is not None else 0 * p.scale_base for p in parts])
        return QuantizedTensor(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scale for p in parts]),
            offsets,
            first.bits,
            first.group_size,
            *bases,
        )

    @staticmethod
    def common_form(parts: list[QuantizedTensor]) -> list[QuantizedTensor] | None:
        """The parts with the same code dtype, bits, group size and offsets, representing the same values exactly:
        groups split to the smallest (parameters repeated), unsigned codes widened to int8 when some part is signed
        or has more than 4 bits, zero offsets where a part has none. None when no such form exists (groups that do
        not divide each other, unsigned codes above 127 beside signed ones)."""
        forms = {(p.codes.dtype, p.bits, p.group_size, p.offset is not None) for p in parts}
        if len(forms) == 1:
            return parts
        group = min(p.group_size for p in parts)
        columns = parts[0].codes.shape[1]
        if any(p.group_size % group or p.codes.shape[1] != columns for p in parts) or columns % group:
            return None
        unsigned = all(p.codes.dtype == torch.uint8 and p.bits <= 4 for p in parts)
        if not unsigned and any(p.codes.dtype == torch.uint8 and p.bits > 7 for p in parts):
            return None
        bits = max(p.bits for p in parts) if not unsigned else 4
        with_offsets = any(p.offset is not None for p in parts)
        common = []
        for p in parts:
            scale = p.per_column(p.scale, group)
            if p.offset is not None:
                offset = p.per_column(p.offset, group)
            else:
                offset = torch.zeros_like(scale) if with_offsets else None
            codes = p.codes if unsigned else p.codes.to(torch.int8)
            common.append(QuantizedTensor(codes, scale, offset, bits, group, p.scale_base, p.offset_base))
        return common

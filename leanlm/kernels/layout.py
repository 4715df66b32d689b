"""Repack a QuantizedTensor into the layout leanlm's C++ kernels read (see csrc/quant_linear.cpp).

Rows are taken 8 at a time (padded with zero rows) and interleaved 4 inputs at a time, so that one 32-byte load
holds 4 inputs of 8 rows; scales and offsets are stored 8 per block (one per row), as float16 when that is
exact (GGUF's legacy blocks always are) and float32 otherwise (K-quant scales d * sc, leanlm's own).
A weight with groups of 16 (GGUF's Q6_K; a Q4_K row segment fused beside one) stores two scales per block: 8
for inputs 0-15, then 8 for 16-31.
K-quant weights (QuantizedTensor.scale_base set) store int8 multipliers instead, and one float16 base per 256
inputs per row, as the GGUF file does: about 4.6 bits per Q4_K weight where float32 parameters take 6.
q8 weights whose codes fit 5 or 6 bits (GGUF's Q5_0/Q5_1/Q5_K/Q6_K, and a Q4_K beside a Q6_K in their common
form) are packed: each q8 slab's code + zero (zero 2^(bits-1) for signed codes, 0 for unsigned) split into a
nibble plane and a 1- or 2-bit plane, 160 or 192 bytes a block where 256 held them (quant_linear.cpp decodes
them in registers); an int8 codes tensor marks signed codes.
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
    codes: torch.Tensor  # (groups, blocks, 32 * bits): 128 q4, 256 q8, 160 / 192 packed (int8: signed codes); uint8
    scales: torch.Tensor  # (groups, blocks, 8) float16, or float32 when float16 would round them; (.., 16): sub16
    offsets: torch.Tensor | None  # (groups, blocks, 8), in the scales' dtype
    rows: int
    q4: bool
    scale_base: torch.Tensor | None = None  # (groups, blocks / 8, 8) float16: scales are int8 multipliers of it
    offset_base: torch.Tensor | None = None  # likewise for the offsets

    rest: KernelWeight | None = None  # the rows after these, in another layout (pack_segments)
    form: tuple[int, int] | None = None  # a segment's (bits, group size), which unpack needs

    def segments(self) -> list[KernelWeight]:
        """This layout and the row segments after it, in row order."""
        return [self] + ([] if self.rest is None else self.rest.segments())

    def tensors(self) -> list[torch.Tensor | None]:
        """codes, scales, offsets, scale_base, offset_base: what the ops take after the activations."""
        return [self.codes, self.scales, self.offsets, self.scale_base, self.offset_base]

    @property
    def code_bits(self) -> int:
        """Bits a code is stored in: 4 (q4), 5 or 6 (packed), 8 (q8)."""
        return self.codes.shape[2] // BLOCK

    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)
        return own + (0 if self.rest is None else self.rest.nbytes())


def kernel_format(weight: QuantizedTensor) -> str | None:
    """'q4' or 'q8' when the kernels can run this weight, else None (the caller keeps the torch path).
    q4: unsigned codes of up to 4 bits; q8: int8 codes (GGUF's 5- and 6-bit codes too), with or without offsets,
    groups of 32 or more, or of 16 (two scales per block) when each pair of groups shares its offset."""
    columns = weight.codes.shape[1]
    if columns % BLOCK or not (weight.group_size % BLOCK == 0 or _sub16(weight)):
        return None
    if weight.bits <= 4 and weight.codes.dtype == torch.uint8:
        return "q4"
    if weight.bits <= 8 and weight.codes.dtype == torch.int8:
        return "q8"
    return None


def _sub16(weight: QuantizedTensor) -> bool:
    """Groups of 16 whose offsets (if any) are equal in each block of 32: the kernels' two-scale blocks."""
    if weight.group_size != 16:
        return False
    return weight.offset is None or bool(torch.equal(weight.offset[:, 0::2], weight.offset[:, 1::2]))


CHUNK_GROUPS = 2048  # row groups laid out at a time: the temporaries of a 151936-row LM head stay small


def _layout_codes(weight: QuantizedTensor, kind: str, groups: int, blocks: int) -> torch.Tensor:
    """The codes in the kernels' layout, (groups, blocks, bytes a block), chunk by chunk of row groups."""
    layout = packed_bits(weight) if kind == "q8" else None
    width = 128 if kind == "q4" else 256 if layout is None else BLOCK * layout[0]
    out = torch.empty(groups, blocks, width, dtype=torch.uint8)
    for first in range(0, groups, CHUNK_GROUPS):
        count = min(CHUNK_GROUPS, groups - first)
        rows = weight.codes[first * ROWS : (first + count) * ROWS]
        rows = F.pad(rows, (0, 0, 0, count * ROWS - rows.shape[0]))  # the last group's missing rows: zeros
        codes = rows.view(count, ROWS, blocks, BLOCK).transpose(1, 2)  # (G, B, 8, 32)
        if kind == "q4":
            nibbles = codes[..., :16] | (codes[..., 16:] << 4)  # byte e: input e low, input 16 + e high
            slabs = nibbles.reshape(count, blocks, ROWS, 4, 4).transpose(2, 3)  # (G, B, slab, row, 4 inputs)
        else:
            slabs = codes.view(torch.uint8).reshape(count, blocks, ROWS, 8, 4).transpose(2, 3)
        chunk = slabs.reshape(count, blocks, -1)
        if layout is not None:  # uint8 arithmetic wraps: a signed code's byte + zero is code + zero
            chunk = _pack_slabs((chunk + layout[1]).view(count, blocks, 8, BLOCK), layout[0])
        out[first : first + count] = chunk
    return out.view(torch.int8) if layout is not None and layout[1] else out


def packed_bits(weight: QuantizedTensor) -> tuple[int, int] | None:
    """(bits, zero) of the packed layout for a q8 weight whose codes fit 5 or 6 bits as code + zero (zero
    2^(bits-1) for signed codes, 0 for unsigned ones); None when they do not (the weight stays 8-bit)."""
    if weight.codes.dtype != torch.int8 or weight.bits > 6:
        return None
    bits = 5 if weight.bits <= 5 else 6
    low, high = (int(v) for v in torch.aminmax(weight.codes))
    if -(1 << (bits - 1)) <= low and high < 1 << (bits - 1):
        return bits, 1 << (bits - 1)
    if low >= 0 and high < 1 << bits:
        return bits, 0
    return None


def _pack_slabs(slabs: torch.Tensor, bits: int) -> torch.Tensor:
    """(G, B, 8 slabs, 32) unsigned codes below 2^bits -> (G, B, 32 * bits): a nibble plane (slab j: slab j's low
    4 bits, slab j + 4's high) and the upper bits (6-bit: slab h, bits 2k..2k+1 of slab h + 2k; 5-bit: bit c of
    slab c)."""
    nibbles = (slabs[:, :, :4] & 0x0F) | ((slabs[:, :, 4:] & 0x0F) << 4)
    upper = slabs >> 4
    if bits == 6:
        planes = [sum((upper[:, :, h + 2 * k] & 3) << (2 * k) for k in range(4)) for h in range(2)]
    else:
        planes = [sum((upper[:, :, c] & 1) << c for c in range(8))]
    return torch.cat([nibbles, torch.stack(planes, dim=2)], dim=2).reshape(*slabs.shape[:2], -1)


def _unpack_slabs(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """_pack_slabs undone: (G, B, 32 * bits) -> (G, B, 8, 32)."""
    planes = codes.view(torch.uint8).reshape(*codes.shape[:2], bits, 32)
    nibbles, upper = planes[:, :, :4], planes[:, :, 4:]
    slabs = []
    for c in range(8):
        low = (nibbles[:, :, c % 4] >> (4 * (c // 4))) & 0x0F
        high = (upper[:, :, c % 2] >> (2 * (c // 2))) & 3 if bits == 6 else (upper[:, :, 0] >> c) & 1
        slabs.append(low | (high << 4))
    return torch.stack(slabs, dim=2)


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
    packed = _layout_codes(weight, kind, groups, blocks)

    def per_row(per_group: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(N, blocks * halves) parameters -> (groups, blocks, halves * 8): a block's 8 rows, half after half."""
        halves = per_group.shape[1] // blocks
        padded = F.pad(per_group, (0, 0, 0, pad)).view(groups, ROWS, blocks, halves)
        return padded.permute(0, 2, 3, 1).reshape(groups, blocks, halves * ROWS).contiguous().to(dtype)

    # per block (or per half block for sub16 scales); a sub16 weight's offsets are equal over each block's halves
    scale = weight.scale if weight.group_size == 16 else weight.per_column(weight.scale, BLOCK)
    offset = None
    if weight.offset is not None:
        offset = weight.offset[:, 0::2] if weight.group_size == 16 else weight.per_column(weight.offset, BLOCK)
    if (factors := _super_block_factors(weight, scale, offset)) is not None:
        (scale_m, scale_base), (offset_m, offset_base) = factors
        base = [None if b is None else _rows_last(F.pad(b, (0, 0, 0, pad))) for b in (scale_base, offset_base)]
        offsets = None if offset_m is None else per_row(offset_m, torch.int8)
        return KernelWeight(packed, per_row(scale_m, torch.int8), offsets, rows, kind == "q4", *base)
    dtype = torch.float16 if all(fits_float16(p) for p in (scale, offset) if p is not None) else torch.float32
    offsets = None if offset is None else per_row(offset, dtype)
    return KernelWeight(packed, per_row(scale, dtype), offsets, rows, kind == "q4")


SUPER_BLOCK = 256
MAX_SEGMENTS = 4


def pack_segments(weight: QuantizedTensor) -> KernelWeight:
    """`pack`, but a fused projection whose row runs hold fewer bits apart than in their common form (a Q4_K_M
    file's Q4_K q/k beside a Q6_K v: q/k as q4 instead of 6-bit; Q5_0 q/k beside a Q8_0 v: 5-bit instead of 8) is
    packed run by run, chained through `rest`. Runs start at multiples of 8 rows (the kernels' row groups)."""
    runs = _narrow_runs(weight)
    if runs is None:
        return pack(weight)
    packed = [pack(part) for part in runs]
    for layout, part in zip(packed, runs, strict=True):
        layout.form = (part.bits, part.group_size)
    for first, second in zip(packed, packed[1:], strict=False):
        first.rest = second
    return packed[0]


def unpack_segments(packed: KernelWeight, bits: int, group_size: int) -> QuantizedTensor:
    """`unpack` of a layout from pack_segments: the segments' stored forms stacked in their common form, which
    is the form they were split from."""
    if packed.rest is None:
        return unpack(packed, bits, group_size)
    return QuantizedTensor.cat([unpack(segment, *segment.form) for segment in packed.segments()])


def _narrowest(weight: QuantizedTensor) -> QuantizedTensor:
    """The same values in the form that packs smallest: int8 codes of 0..15 as q4, codes that fit 5 or 6 bits
    declared so (the packed layouts). Groups stay as they are: the kernels' arithmetic per row is then the common
    form's (a Q4_K row in a fused projection runs as it did beside its Q6_K v, its scales per 16)."""
    codes = weight.codes
    if codes.dtype != torch.int8:
        return weight
    low, high = (int(v) for v in torch.aminmax(codes))
    if low >= 0 and high < 16:
        narrow, bits = codes.to(torch.uint8), 4
    else:
        fits = [b for b in (5, 6) if -(1 << (b - 1)) <= low and high < 1 << (b - 1) or 0 <= low and high < 1 << b]
        narrow, bits = codes, min([weight.bits, *fits])
    return QuantizedTensor(
        narrow, weight.scale, weight.offset, bits, weight.group_size, weight.scale_base, weight.offset_base
    )


def _narrow_runs(weight: QuantizedTensor) -> list[QuantizedTensor] | None:
    """The weight as runs of 8-row groups that pack narrower apart, or None when one layout is as small."""
    rows, columns = weight.codes.shape
    if weight.codes.dtype != torch.int8 or rows <= ROWS or kernel_format(weight) is None:
        return None
    pad = -rows % ROWS  # the last group's missing rows repeat its last row (they change no minimum or maximum)
    codes = torch.cat([weight.codes, weight.codes[-1:].expand(pad, -1)]).view(-1, ROWS * columns)
    low, high = (v.int() for v in torch.aminmax(codes, dim=1))
    # per 8-row group, the layout _narrowest picks: q4, then 5 and 6 bits (signed first, as packed_bits), else 8
    kind = torch.full_like(low, 8)
    for code, bits, signed in ((61, 6, True), (60, 6, False), (51, 5, True), (50, 5, False)):
        fits = (low >= -(1 << (bits - 1))) & (high < 1 << (bits - 1)) if signed else (low >= 0) & (high < 1 << bits)
        kind = torch.where(fits & (bits <= weight.bits), code, kind)
    kind = torch.where((low >= 0) & (high < 16), 4, kind)
    changes = (torch.nonzero(kind[1:] != kind[:-1]).flatten() + 1).tolist()
    if not changes or len(changes) >= MAX_SEGMENTS:
        return None
    starts = [0] + [c * ROWS for c in changes] + [rows]
    bounds = zip(starts, starts[1:], strict=False)
    runs = [_narrowest(weight.map_rows(lambda t, a=a, b=b: t[a:b])) for a, b in bounds]
    if any(kernel_format(run) is None for run in runs):
        return None
    return runs


def _rows_last(per_super_block: torch.Tensor) -> torch.Tensor:
    """(groups * 8, super-blocks) -> (groups, super-blocks, 8) float16: one group's 8 rows side by side."""
    rows, supers = per_super_block.shape
    return per_super_block.view(rows // ROWS, ROWS, supers).transpose(1, 2).contiguous().to(torch.float16)


def _super_block_factors(weight: QuantizedTensor, scale: torch.Tensor, offset: torch.Tensor | None):
    """((scale multipliers, bases), (offset multipliers, bases)) with params == multiplier * base exactly, int8
    multipliers and float16 bases, one per 256 inputs (GGUF K-quants); None when the weight is not so made."""
    if weight.scale_base is None or weight.codes.shape[1] % SUPER_BLOCK:
        return None
    if offset is not None and weight.offset_base is None:
        return None

    def factor(params: torch.Tensor, base: torch.Tensor):
        if not fits_float16(base):
            return None
        per_group = base.repeat_interleave(params.shape[1] // base.shape[1], dim=1)
        multiplier = torch.where(per_group == 0, 0.0, params / per_group).round()
        if multiplier.min() < -128 or multiplier.max() > 127 or not torch.equal(multiplier * per_group, params):
            return None
        return multiplier.to(torch.int8), base

    scales = factor(scale, weight.scale_base)
    offsets = (None, None) if offset is None else factor(offset, weight.offset_base)
    if scales is None or offsets is None:
        return None
    return scales, offsets


def unpack(packed: KernelWeight, bits: int, group_size: int) -> QuantizedTensor:
    """The QuantizedTensor that `pack` made this layout from, exactly (QuantizedLinear keeps only the layout)."""
    groups, blocks = packed.codes.shape[:2]
    if packed.q4:
        nibbles = packed.codes.view(groups, blocks, 4, ROWS, 4).transpose(2, 3).reshape(groups, blocks, ROWS, 16)
        codes = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1)  # inputs 0-15 low, 16-31 high
    else:
        raw = packed.codes
        if packed.code_bits != 8:  # packed: back to the q8 slabs, less the zero
            zero = 1 << (packed.code_bits - 1) if raw.dtype == torch.int8 else 0
            raw = (_unpack_slabs(raw, packed.code_bits) - zero).reshape(groups, blocks, -1)
        slabs = raw.view(torch.uint8).view(groups, blocks, 8, ROWS, 4).transpose(2, 3)
        codes = slabs.reshape(groups, blocks, ROWS, BLOCK).view(torch.int8)
    codes = codes.transpose(1, 2).reshape(groups * ROWS, blocks * BLOCK)[: packed.rows].contiguous()

    def per_group(params: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        halves = params.shape[2] // ROWS
        values = params.view(groups, blocks, halves, ROWS).permute(0, 3, 1, 2).reshape(groups * ROWS, -1).float()
        if base is not None:
            values = values * _per_row_base(base).repeat_interleave(values.shape[1] // base.shape[1], dim=1)
        return values[: packed.rows]

    bases = [None if b is None else _per_row_base(b)[: packed.rows] for b in (packed.scale_base, packed.offset_base)]
    scale = per_group(packed.scales, packed.scale_base)
    offset = None if packed.offsets is None else per_group(packed.offsets, packed.offset_base)
    if group_size == 16:
        offset = None if offset is None else offset.repeat_interleave(2, dim=1)
    else:  # per block -> per group: the first block of each group (a short last group included)
        scale = scale[:, :: group_size // BLOCK].contiguous()
        offset = None if offset is None else offset[:, :: group_size // BLOCK].contiguous()
    return QuantizedTensor(codes, scale, offset, bits, group_size, *bases)


def _per_row_base(base: torch.Tensor) -> torch.Tensor:
    """(groups, super-blocks, 8) float16 -> (groups * 8, super-blocks) float32."""
    return base.transpose(1, 2).reshape(-1, base.shape[1]).float()

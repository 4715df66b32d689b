"""Attention over block tables for one step's flattened batch of sequences.

The batch is one row of N tokens: first the decode sequences (one query token each), then the others (prefill
chunks). Each layer writes its new keys and values to their slots, then attends: the decode queries together,
over their keys gathered into a padded (B, H_kv, S_max, D) batch with a mask; every other sequence on its own,
causally over its cached tokens and the new ones. One decode sequence whose blocks are consecutive reads the
cache as a plain slice, which keeps batch-1 decoding as cheap as a contiguous cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from leanlm.cache.paged_kv import Index, PagedKVCache, StackLayout


@dataclass(frozen=True)
class SequenceSlice:
    """The part of one sequence that runs this step."""

    start: int  # position of its first query token; positions before it are in the cache
    num_tokens: int
    block_ids: list[int]
    contiguous: bool  # block_ids are consecutive

    @property
    def length(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class _Segment:
    rows: slice  # its query tokens in the batch
    key_slots: Index  # every key it attends to, in position order


@dataclass(frozen=True)
class _DecodeBatch:
    rows: slice
    key_slots: Index  # (B * S_max,) padded with the null slot, or one sequence's slots
    mask: torch.Tensor | None  # (B, 1, 1, S_max) True = a real key; None for one sequence
    max_len: int


class PagedAttention:
    """`attend(layer, q, k, v)` for one forward pass; build it with `build_paged_attention`."""

    def __init__(
        self,
        cache: PagedKVCache,
        backend: Callable,
        write_slots: Index,
        decode: _DecodeBatch | None,
        others: list[_Segment],
    ):
        self.cache, self.backend, self.write_slots, self.decode, self.others = (
            cache,
            backend,
            write_slots,
            decode,
            others,
        )
        self.sequences: list[SequenceSlice] = []  # set by build_paged_attention

    def layout(self) -> StackLayout:
        return stack_layout(self.cache, self.sequences)

    def __call__(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None = None,
        window: int | None = None,
    ) -> torch.Tensor:
        """q: (1, H, N, D); k, v: (1, H_kv, N, D). Returns (1, H, N, D) in the cache's compute dtype.
        scale: of q.k (None: head_dim ** -0.5); window: the layer's sliding window, if any."""
        self.cache.write(layer, self.write_slots, k[0], v[0])
        q = q.to(self.cache.dtype)
        attend = partial(self.backend, scale=scale, window=window)
        parts = [] if self.decode is None else [self._decode(layer, q, attend)]
        for segment in self.others:
            keys, values = self.cache.read(layer, segment.key_slots)  # (H_kv, S, D)
            parts.append(attend(q[:, :, segment.rows], keys[None], values[None]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def _decode(self, layer: int, q: torch.Tensor, attend: Callable) -> torch.Tensor:
        batch = self.decode
        keys, values = self.cache.read(layer, batch.key_slots)  # (H_kv, B * S_max, D)
        if batch.mask is None:
            return attend(q[:, :, batch.rows], keys[None], values[None])
        num_seqs = batch.mask.shape[0]
        heads, _, dim = keys.shape
        keys = keys.view(heads, num_seqs, batch.max_len, dim).transpose(0, 1)  # (B, H_kv, S_max, D)
        values = values.view(heads, num_seqs, batch.max_len, dim).transpose(0, 1)
        queries = q[0, :, batch.rows].transpose(0, 1).unsqueeze(2)  # (B, H, 1, D)
        out = attend(queries, keys, values, batch.mask)  # (B, H, 1, D)
        return out.squeeze(2).transpose(0, 1).unsqueeze(0)  # (1, H, B, D)


class ContiguousAttention:
    """One sequence whose blocks are consecutive (batch-1 decoding, mostly): the cache is a contiguous cache here,
    so each layer copies its new keys and values into place and attends over a view, like KVCache does."""

    def __init__(self, cache: PagedKVCache, backend: Callable, sequence: SequenceSlice, views):
        self.dtype, self.backend = cache.dtype, backend
        self.keys, self.values = views  # (L, 1, H_kv, S, D): the sequence's slots in every layer
        written = slice(sequence.start, sequence.length)
        self.new_keys, self.new_values = self.keys[:, :, :, written], self.values[:, :, :, written]
        self.cache, self.sequences = cache, [sequence]

    def layout(self) -> StackLayout:
        return stack_layout(self.cache, self.sequences)

    def __call__(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None = None,
        window: int | None = None,
    ) -> torch.Tensor:
        self.new_keys[layer].copy_(k)  # (1, H_kv, T, D), converted to the cache dtype
        self.new_values[layer].copy_(v)
        return self.backend(q.to(self.dtype), self.keys[layer], self.values[layer], scale=scale, window=window)


def build_paged_attention(
    cache: PagedKVCache, backend: Callable, sequences: list[SequenceSlice], device: torch.device | str = "cpu"
) -> PagedAttention | ContiguousAttention:
    """sequences in batch order; the leading single-token ones form the decode batch."""
    size = cache.block_size
    if len(sequences) == 1 and sequences[0].contiguous:
        first = sequences[0].block_ids[0] * size
        views = cache.views(slice(first, first + sequences[0].length))
        if views is not None:
            return ContiguousAttention(cache, backend, sequences[0], views)
    num_decode = 0
    while num_decode < len(sequences) and sequences[num_decode].num_tokens == 1:
        num_decode += 1
    if len(sequences) == 1 and sequences[0].contiguous:
        only = sequences[0]
        first = only.block_ids[0] * size
        write_slots: Index = slice(first + only.start, first + only.length)
    else:
        write_slots = torch.tensor(
            [seq.block_ids[p // size] * size + p % size for seq in sequences for p in range(seq.start, seq.length)],
            dtype=torch.long,
            device=device,
        )
    decode = _decode_batch(cache, sequences[:num_decode], device) if num_decode else None
    others, row = [], num_decode
    for seq in sequences[num_decode:]:
        others.append(_Segment(slice(row, row + seq.num_tokens), _key_slots(seq, size, device)))
        row += seq.num_tokens
    attention = PagedAttention(cache, backend, write_slots, decode, others)
    attention.sequences = sequences
    return attention


def stack_layout(cache: PagedKVCache, sequences: list[SequenceSlice]) -> StackLayout:
    """The block tables of one step's sequences, for a model that runs all its layers in one kernel call."""
    device = cache.keys.device
    width = max(len(seq.block_ids) for seq in sequences)
    tables = torch.tensor([seq.block_ids + [0] * (width - len(seq.block_ids)) for seq in sequences], device=device)
    counts = torch.tensor([seq.num_tokens for seq in sequences], device=device)
    row_sequence = torch.repeat_interleave(torch.arange(len(sequences), device=device), counts)
    return StackLayout(cache.keys, cache.values, tables, cache.block_size, row_sequence)


def _key_slots(seq: SequenceSlice, size: int, device: torch.device | str) -> Index:
    if seq.contiguous:
        first = seq.block_ids[0] * size
        return slice(first, first + seq.length)
    blocks = torch.tensor(seq.block_ids[: -(-seq.length // size)], dtype=torch.long, device=device)
    return (blocks[:, None] * size + torch.arange(size, device=device)).flatten()[: seq.length]


def _decode_batch(cache: PagedKVCache, sequences: list[SequenceSlice], device: torch.device | str) -> _DecodeBatch:
    rows = slice(0, len(sequences))
    if len(sequences) == 1:
        return _DecodeBatch(rows, _key_slots(sequences[0], cache.block_size, device), None, sequences[0].length)
    size = cache.block_size
    lengths = [seq.length for seq in sequences]
    max_len = max(lengths)
    width = -(-max_len // size)
    table = torch.tensor(
        [
            seq.block_ids[: -(-seq.length // size)] + [cache.null_block] * (width - -(-seq.length // size))
            for seq in sequences
        ],
        dtype=torch.long,
        device=device,
    )  # (B, blocks), padded with the null block
    slots = (table[:, :, None] * size + torch.arange(size, device=device)).view(len(sequences), -1)[:, :max_len]
    valid = torch.arange(max_len, device=device)[None] < torch.tensor(lengths, device=device)[:, None]  # (B, S_max)
    slots = slots.masked_fill(~valid, cache.null_slot)  # never read a slot that may hold garbage
    return _DecodeBatch(rows, slots.reshape(-1), valid[:, None, None, :], max_len)

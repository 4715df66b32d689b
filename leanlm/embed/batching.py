"""Token lists -> padded batches in length order (as sentence-transformers sorts), and back to input order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def length_sorted_batches(token_ids: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices of the inputs, longest first, in groups of `batch_size`: each batch pads to similar lengths."""
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def pad_batch(
    rows: Sequence[Sequence[int]], pad_id: int, type_ids: Sequence[Sequence[int]] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) input_ids, attention_mask and token_type_ids."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
        if type_ids is not None:
            types[i, : len(row)] = torch.tensor(type_ids[i], dtype=torch.long)
    return ids, mask, types

"""Paged attention over random block tables equals reference_attention on each sequence's contiguous K/V."""

import pytest
import torch

from leanlm.cache.paged_kv import PagedInt8KVCache, PagedKVCache
from leanlm.engine.paged_attention import SequenceSlice, build_paged_attention
from leanlm.layers.attention import fused_attention, reference_attention, sdpa_attention

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 16, 4


def run_case(cache_class, backend, cases, seed=0, num_blocks=64):
    """cases: (start, num_tokens, contiguous) per sequence, in batch order (decodes first).
    Returns [(paged output, reference output)] per sequence."""
    gen = torch.Generator().manual_seed(seed)
    cache = cache_class(2, num_blocks, BLOCK, KV_HEADS, DIM, torch.float32)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    sequences, histories = [], []
    for start, num_tokens, contiguous in cases:
        length = start + num_tokens
        count = -(-length // BLOCK) + 1  # one spare block beyond the sequence, as a running request may have
        if contiguous:
            first = free.pop()
            ids = list(range(first, first + count)) if first + count <= num_blocks else list(range(count))
            free = [b for b in free if b not in ids]
        else:
            ids = [free.pop() for _ in range(count)]
        sequences.append(SequenceSlice(start, num_tokens, ids, contiguous))
        k, v = (torch.randn(KV_HEADS, length, DIM, generator=gen) for _ in range(2))
        slots = torch.tensor([ids[p // BLOCK] * BLOCK + p % BLOCK for p in range(start)], dtype=torch.long)
        cache.write(1, slots, k[:, :start], v[:, :start])  # the history, computed in earlier steps
        histories.append((k, v))
    attend = build_paged_attention(cache, backend, sequences)
    q = torch.randn(1, HEADS, sum(n for _, n, _ in cases), DIM, generator=gen)
    new_k = torch.cat([k[:, s.start :] for (k, _), s in zip(histories, sequences, strict=True)], dim=1)[None]
    new_v = torch.cat([v[:, s.start :] for (_, v), s in zip(histories, sequences, strict=True)], dim=1)[None]
    out = attend(1, q, new_k, new_v)
    assert out.shape == q.shape
    results, row = [], 0
    for (k, v), seq in zip(histories, sequences, strict=True):
        expected = reference_attention(q[:, :, row : row + seq.num_tokens], k[None], v[None])
        results.append((out[:, :, row : row + seq.num_tokens], expected))
        row += seq.num_tokens
    return results


MIXED = [(9, 1, False), (3, 1, True), (17, 1, False), (0, 1, False), (0, 7, False), (5, 6, True), (12, 4, False)]


def fused_or_skip(*args, **kwargs):
    from leanlm.kernels.build import load_kernels

    if not load_kernels():
        pytest.skip("leanlm's kernels are not built here")
    return fused_attention(*args, **kwargs)


@pytest.mark.parametrize("backend", [sdpa_attention, reference_attention, fused_or_skip])
@pytest.mark.parametrize(
    "cases",
    [
        MIXED,
        [(20, 1, True)],  # batch-1 decode, slice reads
        [(20, 1, False)],  # batch-1 decode, gathered
        [(0, 13, True)],  # one fresh prompt
        [(8, 5, False)],  # one prefill chunk after cached tokens
        [(4, 1, False), (30, 1, False)],  # decodes only, padded to the longest
    ],
)
def test_paged_attention_matches_reference(backend, cases):
    for got, expected in run_case(PagedKVCache, backend, cases):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_int8_paged_attention_stays_close():
    for got, expected in run_case(PagedInt8KVCache, sdpa_attention, MIXED, seed=1):
        torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)


def test_padded_reads_never_touch_unwritten_slots():
    cache = PagedKVCache(1, 8, BLOCK, KV_HEADS, DIM, torch.float32)
    cache.keys.fill_(float("nan"))  # what uninitialized memory may hold
    cache.values.fill_(float("nan"))
    cache.keys[:, :, cache.null_slot :] = 0
    cache.values[:, :, cache.null_slot :] = 0
    sequences = [SequenceSlice(0, 1, [2], True), SequenceSlice(5, 1, [0, 5], False)]
    attend = build_paged_attention(cache, sdpa_attention, sequences)
    out = attend(0, torch.randn(1, HEADS, 2, DIM), torch.randn(1, KV_HEADS, 2, DIM), torch.randn(1, KV_HEADS, 2, DIM))
    assert not out[:, :, 0].isnan().any()  # the short sequence's padding reads the zeroed null block

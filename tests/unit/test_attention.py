"""The fast attention path must match the plain formula (tolerances per dtype)."""

import math

import pytest
import torch

from leanlm.layers.attention import causal_mask, reference_attention, sdpa_attention

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch,heads,kv_heads,query_len,key_len,head_dim",
    [
        (1, 9, 3, 1, 17, 64),  # decode step over a cache, GQA 3:1
        (2, 9, 3, 23, 23, 64),  # prefill, GQA
        (2, 4, 4, 5, 12, 32),  # continuation chunk over a cache, no GQA
        (3, 8, 2, 16, 16, 128),
    ],
)
def test_sdpa_matches_reference(dtype, batch, heads, kv_heads, query_len, key_len, head_dim):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, query_len, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, key_len, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, key_len, head_dim, generator=gen).to(dtype)
    torch.testing.assert_close(
        sdpa_attention(q, k, v).float(), reference_attention(q, k, v).float(), **TOLERANCE[dtype]
    )


def test_padding_mask_matches_reference():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 6, 7, 16, generator=gen) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    valid = torch.tensor([[True] * 7, [False] * 3 + [True] * 4])
    mask = (causal_mask(7, 7) & valid[:, None, :]) | torch.eye(7, dtype=torch.bool)
    mask = mask.unsqueeze(1)
    torch.testing.assert_close(sdpa_attention(q, k, v, mask), reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_reference_is_the_formula():
    """One head, no GQA, written out with explicit loops over the causal rows."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    expected = torch.empty_like(q)
    for t in range(4):
        scores = torch.stack([q[0, 0, t] @ k[0, 0, s] / math.sqrt(8) for s in range(t + 1)])
        expected[0, 0, t] = scores.softmax(0) @ v[0, 0, : t + 1]
    torch.testing.assert_close(reference_attention(q, k, v), expected)


def test_causal_mask_offsets_queries_to_the_end():
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]

"""Roofline arithmetic on known cases (SmolLM2-135M's shape, numbers worked out by hand)."""

import pytest

from leanlm.bench.roofline import decode_bound, decode_weight_bytes, kv_cache_bytes, layer_parameters, prefill_flops
from leanlm.config import ModelConfig

SMOLLM2 = ModelConfig(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    context_length=8192,
    tie_word_embeddings=True,
)


def test_weight_bytes():
    # per layer: q 576x576 + k,v 576x192 each + o 576x576 + 3 MLP 576x1536 + 2 norms of 576
    per_layer = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536 + 2 * 576
    assert layer_parameters(SMOLLM2) == 30 * per_layer + 576
    head = 49152 * 576
    assert decode_weight_bytes(SMOLLM2, 16) == (30 * per_layer + 576 + head) * 2
    assert decode_weight_bytes(SMOLLM2, 4) == (30 * per_layer + 576 + head) // 2


def test_kv_cache_bytes():
    # 30 layers x (K and V) x 3 heads x 64 dims x 4 bytes = 46080 bytes per token
    assert kv_cache_bytes(SMOLLM2, 1, 4) == 46080
    assert kv_cache_bytes(SMOLLM2, 100, 2) == 46080 * 100 // 2


def test_decode_bound_matches_machine_notes():
    """MACHINE.md: at 22 GB/s, about 82 tok/s for 16-bit weights and 41 for float32 (KV cache ignored)."""
    assert decode_bound(SMOLLM2, 16, 0, 2, 22.0).tokens_per_s == pytest.approx(82, rel=0.01)
    assert decode_bound(SMOLLM2, 32, 0, 4, 22.0).tokens_per_s == pytest.approx(41, rel=0.01)
    with_cache = decode_bound(SMOLLM2, 16, 1000, 4, 22.0)
    assert with_cache.bytes_per_token == decode_weight_bytes(SMOLLM2, 16) + 46080 * 1000
    assert with_cache.tokens_per_s == pytest.approx(22e9 / (decode_weight_bytes(SMOLLM2, 16) + 46_080_000))


def test_prefill_flops():
    linear = 2 * layer_parameters(SMOLLM2) * 10 + 2 * 49152 * 576
    attention = 30 * 4 * 9 * 64 * 10 * 11 / 2
    assert prefill_flops(SMOLLM2, 10) == pytest.approx(linear + attention)

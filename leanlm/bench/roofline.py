"""Roofline arithmetic: bytes a decode step must read, FLOPs a prefill must do, and the bounds they imply."""

from __future__ import annotations

from dataclasses import dataclass

from leanlm.config import ModelConfig


@dataclass(frozen=True)
class DecodeBound:
    weight_bytes: int
    kv_cache_bytes: int
    bandwidth_gbs: float

    @property
    def bytes_per_token(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes

    @property
    def tokens_per_s(self) -> float:
        return self.bandwidth_gbs * 1e9 / self.bytes_per_token


def layer_parameters(config: ModelConfig) -> int:
    """Parameters of the decoder layers and final norm: everything except embedding and LM head."""
    embeddings = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return config.num_parameters() - embeddings


def decode_weight_bytes(config: ModelConfig, bits_per_weight: float) -> int:
    """Weights read once per decoded token: every layer plus the LM head. The input embedding is read one
    row per token, so it does not count (a tied LM head is counted once, as the LM head)."""
    params = layer_parameters(config) + config.vocab_size * config.hidden_size
    return int(params * bits_per_weight / 8)


def kv_cache_bytes(config: ModelConfig, context_tokens: int, bytes_per_value: int) -> int:
    """Keys and values of every earlier token, read once per decoded token."""
    return config.num_layers * 2 * config.kv_size * context_tokens * bytes_per_value


def decode_bound(
    config: ModelConfig, bits_per_weight: float, context_tokens: int, kv_bytes_per_value: int, bandwidth_gbs: float
) -> DecodeBound:
    return DecodeBound(
        decode_weight_bytes(config, bits_per_weight),
        kv_cache_bytes(config, context_tokens, kv_bytes_per_value),
        bandwidth_gbs,
    )


def prefill_flops(config: ModelConfig, tokens: int) -> float:
    """Matmul FLOPs of a prefill that computes logits for the last token only (2 per multiply-add)."""
    per_token = 2 * layer_parameters(config)
    linear = per_token * tokens + 2 * config.vocab_size * config.hidden_size  # LM head on one token
    # QK^T and PV over the causal triangle: 2 matmuls x 2 FLOPs x heads x head_dim x T(T+1)/2 per layer
    attention = config.num_layers * 4 * config.num_heads * config.head_dim * tokens * (tokens + 1) / 2
    return float(linear + attention)

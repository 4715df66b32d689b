"""A preallocated, contiguous KV cache: one (batch, kv_heads, max_len, head_dim) slab per layer."""

from __future__ import annotations

import torch


class KVCache:
    """Rows of a batch share column indices: column c of every row holds that row's token c (left-padded prompts)."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(
        self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H_kv, T, D) at columns start..start+T and return every column up to there."""
        end = start + keys.shape[2]  # copy_ converts to the cache dtype
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


def default_cache_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """float32 on CPU: torch's CPU attention is ~5x faster in float32 than in bfloat16 for one query."""
    return torch.float32 if device.type == "cpu" else model_dtype

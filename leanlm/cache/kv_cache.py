"""A preallocated, contiguous KV cache: one (batch, kv_heads, max_len, head_dim) slab per layer."""

from __future__ import annotations

from collections.abc import Callable

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

    def attention(self, start: int, backend: Callable) -> CacheAttention:
        """The `attend` of one model call that writes at column `start` and attends over the columns up to it."""
        return CacheAttention(self, start, backend)


class CacheAttention:
    """attend(layer, q, k, v, scale=, window=) over a contiguous cache, for model calls outside the engine (tests,
    benchmarks): the same interface the engine's paged attention offers."""

    def __init__(self, cache: KVCache | Int8KVCache, start: int, backend: Callable):
        self.cache, self.start, self.backend = cache, start, backend

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale=None, window=None):
        keys, values = self.cache.update(layer, self.start, k, v)
        # Attention runs in the cache's dtype (float32 on CPU, where bfloat16 attention kernels are ~5x slower).
        return self.backend(q.to(keys.dtype), keys, values, None, scale=scale, window=window)


def default_cache_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """float32 on CPU: torch's CPU attention is ~5x faster in float32 than in bfloat16 for one query."""
    return torch.float32 if device.type == "cpu" else model_dtype


class Int8KVCache:
    """Keys and values stored as int8 with one float scale per (head, token): a quarter of a float32 cache.

    Attention reads a dequantized copy of the columns it needs, so this trades a little time per step for
    memory (longer contexts, bigger batches); the error is at most half a step of each vector's own scale.
    """

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
        self.keys = torch.zeros(shape, dtype=torch.int8, device=device)
        self.values = torch.zeros(shape, dtype=torch.int8, device=device)
        self.key_scales = torch.zeros(shape[:-1] + (1,), dtype=torch.float32, device=device)
        self.value_scales = torch.zeros(shape[:-1] + (1,), dtype=torch.float32, device=device)
        self.dtype = dtype  # what attention computes in
        self.max_len = max_len

    def update(
        self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + keys.shape[2]
        for store, scales, new in ((self.keys, self.key_scales, keys), (self.values, self.value_scales, values)):
            codes, scale = quantize_per_vector(new)
            store[layer, :, :, start:end] = codes
            scales[layer, :, :, start:end] = scale
        return (
            self.keys[layer, :, :, :end].to(self.dtype) * self.key_scales[layer, :, :, :end].to(self.dtype),
            self.values[layer, :, :, :end].to(self.dtype) * self.value_scales[layer, :, :, :end].to(self.dtype),
        )

    def nbytes(self) -> int:
        return 2 * (self.keys.numel() + self.key_scales.numel() * 4)

    def attention(self, start: int, backend: Callable) -> CacheAttention:
        return CacheAttention(self, start, backend)


def quantize_per_vector(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dimension: x ~= codes * scale, |error| <= scale / 2."""
    scale = (x.float().abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


KV_CACHE_TYPES = {"auto": KVCache, "int8": Int8KVCache}

"""The KV tensors of the block-based cache: one slab per layer, addressed by slot = block * block_size + offset.

Layout (num_layers, H_kv, num_slots, D): reading a request's slots gives (H_kv, S, D), which is attention's layout,
and a request whose blocks are consecutive is a plain slice (no copy). One extra block at the end, zero-filled, is
the null block that padded reads point at; everything else is allocated uninitialized and read only once written.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from leanlm.cache.kv_cache import quantize_per_vector

Index = torch.Tensor | slice  # slots: a (N,) int64 tensor, or a slice when they are consecutive


class StackLayout(NamedTuple):
    """Where one step's token rows live in the cache, for a kernel that runs every layer in one call."""

    keys: torch.Tensor  # (num_layers, H_kv, num_slots, D), the whole cache
    values: torch.Tensor
    block_tables: torch.Tensor  # (B, W) int64: block ids of each sequence, padded
    block_size: int
    row_sequence: torch.Tensor  # (N,) int64: the sequence of each token row


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        shape = (num_layers, num_kv_heads, (num_blocks + 1) * block_size, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.keys[:, :, self.null_slot :].zero_()
        self.values[:, :, self.null_slot :].zero_()

    @property
    def null_block(self) -> int:
        return self.num_blocks

    @property
    def null_slot(self) -> int:
        return self.num_blocks * self.block_size

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

    def write(self, layer: int, slots: Index, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values: (H_kv, N, D) for the N slots."""
        if isinstance(slots, slice):  # slice assignment converts to the cache dtype
            self.keys[layer, :, slots] = keys
            self.values[layer, :, slots] = values
        else:
            self.keys[layer].index_copy_(1, slots, keys.to(self.dtype))
            self.values[layer].index_copy_(1, slots, values.to(self.dtype))

    def views(self, slots: slice) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(num_layers, 1, H_kv, S, D) views of consecutive slots in every layer, or None when the storage needs
        converting (int8). Made once per step, they spare the decode loop any per-layer indexing."""
        return self.keys[:, None, :, slots], self.values[:, None, :, slots]

    def read(self, layer: int, slots: Index) -> tuple[torch.Tensor, torch.Tensor]:
        """(H_kv, S, D) keys and values of the slots, in the dtype attention computes in."""
        if isinstance(slots, slice):
            return self.keys[layer, :, slots], self.values[layer, :, slots]
        return self.keys[layer].index_select(1, slots), self.values[layer].index_select(1, slots)


class PagedInt8KVCache(PagedKVCache):
    """Keys and values as int8 codes with one float32 scale per (head, token) vector; read back dequantized."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype  # dtype: what attention uses
        shape = (num_layers, num_kv_heads, (num_blocks + 1) * block_size, head_dim)
        self.keys = torch.empty(shape, dtype=torch.int8, device=device)
        self.values = torch.empty(shape, dtype=torch.int8, device=device)
        self.key_scales = torch.empty(shape[:-1] + (1,), dtype=torch.float32, device=device)
        self.value_scales = torch.empty(shape[:-1] + (1,), dtype=torch.float32, device=device)
        for store in (self.keys, self.values, self.key_scales, self.value_scales):
            store[:, :, self.null_slot :].zero_()

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * (head_dim + 4)

    def views(self, slots: slice) -> None:
        return None

    def write(self, layer: int, slots: Index, keys: torch.Tensor, values: torch.Tensor) -> None:
        for store, scales, new in ((self.keys, self.key_scales, keys), (self.values, self.value_scales, values)):
            codes, scale = quantize_per_vector(new)  # (H_kv, N, D), (H_kv, N, 1)
            if isinstance(slots, slice):
                store[layer, :, slots] = codes
                scales[layer, :, slots] = scale
            else:
                store[layer].index_copy_(1, slots, codes)
                scales[layer].index_copy_(1, slots, scale)

    def read(self, layer: int, slots: Index) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(slots, slice):
            pairs = (
                (self.keys[layer, :, slots], self.key_scales[layer, :, slots]),
                (self.values[layer, :, slots], self.value_scales[layer, :, slots]),
            )
        else:
            pairs = (
                (self.keys[layer].index_select(1, slots), self.key_scales[layer].index_select(1, slots)),
                (self.values[layer].index_select(1, slots), self.value_scales[layer].index_select(1, slots)),
            )
        keys, values = (codes.to(self.dtype) * scale.to(self.dtype) for codes, scale in pairs)
        return keys, values


PAGED_KV_CACHE_TYPES = {"auto": PagedKVCache, "int8": PagedInt8KVCache}

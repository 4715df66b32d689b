"""Causal attention: the reference formula softmax(QK^T / sqrt(d)) V and the fast path (torch SDPA).

Both take q (B, H, T, D), k and v (B, H_kv, S, D) with H a multiple of H_kv (grouped-query attention),
and an optional boolean mask (B, 1, T, S) where True means "may attend". With no mask, query t
(the last T of S positions) attends keys 0..S-T+t: the causal rule for a sequence continuing a cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def causal_mask(query_len: int, key_len: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, S) boolean: query t sits at absolute position key_len - query_len + t."""
    offset = key_len - query_len
    rows = torch.arange(query_len, device=device).unsqueeze(1) + offset
    return torch.arange(key_len, device=device).unsqueeze(0) <= rows


def sliding_window_mask(
    mask: torch.Tensor | None, query_len: int, key_len: int, window: int, device: torch.device | None = None
) -> torch.Tensor:
    """The causal (or given) mask, keeping for each query only its `window` latest keys, itself included
    (HF's rule: key j is seen by query i when i - window < j <= i). A query's position is its last allowed key."""
    allowed = causal_mask(query_len, key_len, device) if mask is None else mask
    keys = torch.arange(key_len, device=device)
    position = torch.where(allowed, keys, -1).amax(dim=-1, keepdim=True)
    return allowed & (keys > position - window)


def _windowed(mask, q, k, window):
    """The mask to use: a sliding window only matters when some query has more than `window` keys to see."""
    if window is None or k.shape[2] <= window:
        return mask
    return sliding_window_mask(mask, q.shape[2], k.shape[2], window, q.device)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """The formula, written plainly; computed in at least float32 whatever the input dtype."""
    mask = _windowed(mask, q, k, window)
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).to(compute)  # (B, H, S, D)
    v = v.repeat_interleave(group, dim=1).to(compute)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = (q.to(compute) @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    allowed = causal_mask(q.shape[2], k.shape[2], q.device) if mask is None else mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)  # (B, H, T, D)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """torch's fused kernel. One query over a cache needs no mask; a fresh prompt uses is_causal."""
    mask = _windowed(mask, q, k, window)
    query_len, key_len = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask is None and query_len == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if mask is None and query_len == key_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if mask is None:
        mask = causal_mask(query_len, key_len, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """leanlm's per-query kernel (leanlm/kernels) for float32 on the CPU, SDPA otherwise. Each query is computed
    alone over its keys in order, so its result does not depend on how a prompt is chunked or batched (the
    engine's lossless batching rests on it), and a decode step's one query skips SDPA's setup."""
    mask = _windowed(mask, q, k, window)
    if q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32:
        return torch.ops.leanlm.causal_attention(q, k, v, mask, scale if scale is not None else q.shape[-1] ** -0.5)
    return sdpa_attention(q, k, v, mask, scale)


def self_attention(backend):
    """attend(layer, q, k, v, scale=, window=) for a whole sequence and no cache: each token attends causally over
    the call's own tokens (eval, calibration)."""

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale=None, window=None):
        return backend(q, k, v, None, scale=scale, window=window)

    return attend


# "fused" needs leanlm's kernels loaded (leanlm.kernels.build.load_kernels); models pick it for "sdpa" when it is.
ATTENTION_BACKENDS = {"sdpa": sdpa_attention, "reference": reference_attention, "fused": fused_attention}

"""What encoder-decoder families share (Whisper, Marian, T5): the decoder's cache and its two attentions.

`DecoderCache` holds per-row self-attention keys/values (rows are requests or beams, each with its own length) and
each request's cross-attention keys/values, computed once from its encoder output and never written again.
`self_attention` appends a step's keys/values to the cache and attends over each row's own prefix;
`cross_attention` attends over the row's request's encoder keys (with the source padding mask, where one is set).
A family's decoder layer calls these two between its own norms, projections and position scheme.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.errors import ModelFormatError
from leanlm.kernels.threads import scoped_threads

SMALL_STEP_TOKENS = 16  # decoder steps with at most this many tokens run their layers on one thread


class Attention(nn.Module):
    """Projections of one attention block: q/k/v fused for self-attention; for cross-attention q alone and k/v
    fused (applied once per request to the encoder output). inner: heads x head_dim when it differs from dim (T5)."""

    def __init__(self, dim: int, heads: int, cross: bool, bias: bool = True, inner: int | None = None):
        super().__init__()
        inner = inner or dim
        self.heads, self.head_dim = heads, inner // heads
        self.cross = cross
        if cross:
            self.q_proj = nn.Linear(dim, inner, bias=bias)
            self.kv_proj = nn.Linear(dim, 2 * inner, bias=bias)
        else:
            self.qkv_proj = nn.Linear(dim, 3 * inner, bias=bias)
        self.out_proj = nn.Linear(inner, dim, bias=bias)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)

    def encoder_kv(self, encoder_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values (B, H, S, hd) each: once per request."""
        k, v = self.kv_proj(encoder_output).chunk(2, dim=-1)
        return self.split(k).contiguous(), self.split(v).contiguous()


class DecoderCache:
    """Self-attention keys/values of a batch of decoder rows, each row with its own length, and each request's
    cross-attention keys/values (computed once from its encoder output, never written again). Rows come in
    equal groups per request, request i owning rows i*width .. i*width+width-1 (width: the beam).
    `cross_mask` (requests, 1, 1, S), True for real source tokens, masks a padded batch of sources."""

    def __init__(
        self,
        cross_kv: list[tuple[torch.Tensor, torch.Tensor]],
        capacity: int,
        batch: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        cross_mask: torch.Tensor | None = None,
    ):
        self.cross_kv = cross_kv  # per layer: (requests, H, S, hd) keys and values
        self.cross_mask = cross_mask
        shape = (batch, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in cross_kv]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in cross_kv]
        self.lengths = torch.zeros(batch, dtype=torch.long)
        self.width = batch // cross_kv[0][0].shape[0] if cross_kv else 1

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reorder(self, rows: torch.Tensor, requests: torch.Tensor | None = None) -> None:
        """Continue with rows `rows` of the current ones (beam search: each kept hypothesis takes its parent's
        cache), and with requests `requests` (None: all of them still run)."""
        if requests is not None:
            self.cross_kv = [(k.index_select(0, requests), v.index_select(0, requests)) for k, v in self.cross_kv]
            if self.cross_mask is not None:
                self.cross_mask = self.cross_mask.index_select(0, requests)
        count = self.cross_kv[0][0].shape[0]
        if len(rows) % count:
            raise ValueError(f"{len(rows)} rows cannot be shared evenly by {count} requests")
        self.width = len(rows) // count
        used = int(self.lengths.max()) if len(self.lengths) else 0  # only the written part is copied

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            fresh = torch.empty((len(rows), *tensor.shape[1:]), dtype=tensor.dtype)
            fresh[:, :, :used] = tensor[rows, :, :used]
            return fresh

        self.keys = [gather(k) for k in self.keys]
        self.values = [gather(v) for v in self.values]
        self.lengths = self.lengths.index_select(0, rows)


@dataclass(frozen=True)
class DecodeStep:
    """Where one decoder call writes: its rows, their token positions and the causal mask over each row's keys."""

    rows: torch.Tensor  # (R,) cache rows
    starts: torch.Tensor  # (R,) each row's length before the step
    positions: torch.Tensor  # (R, T) the new tokens' positions
    end: int  # keys to read: the longest row's length after the step
    all_rows: bool  # the step covers every cache row in order (the decode loop), not a few (a prefill)
    causal: torch.Tensor  # (R, 1, T, end) bool: a query at position p sees keys 0..p of its own row

    @classmethod
    def plan(cls, cache: DecoderCache, rows: torch.Tensor | None, steps: int, max_positions: int) -> DecodeStep:
        if rows is None:
            rows = torch.arange(cache.lengths.shape[0])
        starts = cache.lengths[rows]
        end = int(starts.max()) + steps
        if end > min(cache.capacity, max_positions):
            raise ValueError(
                f"the decoder holds at most {min(cache.capacity, max_positions)} tokens; this step would reach {end}"
            )
        positions = starts[:, None] + torch.arange(steps)[None, :]
        causal = torch.arange(end)[None, None, None, :] <= positions[:, None, :, None]
        all_rows = rows.shape[0] == cache.lengths.shape[0] and bool((rows == torch.arange(rows.shape[0])).all())
        return cls(rows, starts, positions, end, all_rows, causal)

    def finish(self, cache: DecoderCache) -> None:
        cache.lengths[self.rows] = self.starts + self.positions.shape[1]


def self_attention(
    cache: DecoderCache,
    layer: int,
    step: DecodeStep,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Write k, v (R, H, T, hd) at the step's positions of layer `layer`'s cache and attend q over each row's keys.
    mask: (R, H|1, T, end) bool or additive float (T5's position bias plus -inf); default the causal mask."""
    keys, values = cache.keys[layer], cache.values[layer]
    index = step.positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    end = step.end
    if step.all_rows:
        keys.scatter_(2, index, k)
        values.scatter_(2, index, v)
        row_k, row_v = keys[:, :, :end], values[:, :, :end]
    else:
        row_k = keys[step.rows].scatter_(2, index, k)
        row_v = values[step.rows].scatter_(2, index, v)
        keys[step.rows], values[step.rows] = row_k, row_v
        row_k, row_v = row_k[:, :, :end], row_v[:, :, :end]
    return F.scaled_dot_product_attention(q, row_k, row_v, attn_mask=step.causal if mask is None else mask, scale=scale)


def cross_attention(
    cache: DecoderCache, layer: int, step: DecodeStep, q: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """q (R, H, T, hd) over the encoder keys/values of each row's request -> (R, H, T, hd)."""
    cross_k, cross_v = cache.cross_kv[layer]
    mask = cache.cross_mask
    if not step.all_rows:  # a few rows (a prompt's prefill): each takes its request's keys and values
        owners = step.rows // cache.width
        row_mask = None if mask is None else mask[owners]
        return F.scaled_dot_product_attention(q, cross_k[owners], cross_v[owners], attn_mask=row_mask, scale=scale)
    # a request's rows share its keys and values: attend as one longer query block
    count, heads, steps, head_dim = q.shape
    groups, width = cross_k.shape[0], cache.width
    grouped = q.view(groups, width, heads, steps, head_dim).transpose(1, 2).reshape(groups, heads, width * steps, -1)
    out = F.scaled_dot_product_attention(grouped, cross_k, cross_v, attn_mask=mask, scale=scale)
    return out.view(groups, heads, width, steps, head_dim).transpose(1, 2).reshape(count, heads, steps, head_dim)


class EncoderDecoderLM(nn.Module):
    """What the text encoder-decoders (Marian, T5) share: cross K/V once per request, the cache, a decode call.
    A family sets `decoder_layers` (each with an `encoder_attn` Attention), `heads`, `head_dim`, `max_positions`,
    and implements `encode(input_ids, attention_mask)`, `decoder_hidden(tokens, cache, step)` and `head(hidden)`."""

    heads: int
    head_dim: int
    max_positions: int  # decoder positions the model allows (its position table), or a generous cap (T5)

    def cross_kv(self, encoder_output: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.encoder_attn.encoder_kv(encoder_output) for layer in self.decoder_layers]

    def new_cache(
        self, cross_kv, batch: int, capacity: int | None = None, cross_mask: torch.Tensor | None = None
    ) -> DecoderCache:
        """cross_mask: the encoder's attention_mask (requests, S), 1 for real tokens; None when nothing is padded."""
        mask = None if cross_mask is None else cross_mask.bool()[:, None, None, :]
        dtype = cross_kv[0][0].dtype
        return DecoderCache(cross_kv, capacity or self.max_positions, batch, self.heads, self.head_dim, dtype, mask)

    def decode(self, tokens: torch.Tensor, cache: DecoderCache, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Append `tokens` (R, T) to cache rows `rows` (all rows when None) and return float32 logits (R, T, V).
        A step of a few tokens runs its layers on one thread, as Whisper's (models/whisper.py says why); the
        vocabulary projection keeps the caller's threads."""
        step = DecodeStep.plan(cache, rows, tokens.shape[1], self.max_positions)
        with scoped_threads(1 if tokens.numel() <= SMALL_STEP_TOKENS else None):
            hidden = self.decoder_hidden(tokens, cache, step)
        step.finish(cache)
        return self.head(hidden).float()


def padding_bias(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) 1/0 -> (B, 1, 1, S) bool for SDPA, or None when nothing is padded (SDPA's unmasked path)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


def load_exact_state(
    model_type: type[nn.Module], config, state: dict[str, torch.Tensor], dtype: torch.dtype, family: str
):
    """model_type(config) with exactly `state` as its weights (cast to dtype), in eval mode; a clear error naming the
    missing and unexpected names otherwise."""
    with torch.device("meta"):
        model = model_type(config)
    model = model.to_empty(device="cpu")
    expected = set(model.state_dict())
    if expected != set(state):
        raise ModelFormatError(
            f"the {family} weights do not match the config: missing {sorted(expected - set(state))[:5]}, "
            f"unexpected {sorted(set(state) - expected)[:5]}"
        )
    model.load_state_dict({name: t.to(dtype) for name, t in state.items()}, strict=True, assign=True)
    return model.eval()

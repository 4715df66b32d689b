"""Whisper as the serving engine runs it: the decoder over one step's flattened batch, with paged self-attention.

The engine's model interface for encoder-decoder models (engine/model_runner.py):
- `is_encoder_decoder = True`;
- `encode_inputs(inputs)`: each request's encoder input (a (n_mels, 3000) window) to its decoder state, here every
  decoder layer's cross-attention keys and values: computed once per request, held read-only by the runner;
- `forward(token_ids, positions, attend=, last_only=, logits_indices=, encoder_states=)`: as a decoder-only model,
  plus `encoder_states`, one (state, row count) per sequence in batch order: the rows of each sequence attend
  across to their own request's keys and values only.
The WhisperModel's weights are shared, not copied: the same model serves speech/decoding.py's own loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.layers.attention import ATTENTION_BACKENDS
from leanlm.models.whisper import WhisperModel, vocabulary_logits

CrossKV = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: (1, H, S, hd) keys and values


@dataclass(frozen=True)
class DecoderShape:
    """What the engine reads from a model's config: the decoder's KV cache shape and limits."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int


class WhisperForEngine(nn.Module):
    is_encoder_decoder = True

    def __init__(self, whisper: WhisperModel):
        super().__init__()
        self.whisper = whisper
        cfg = whisper.config
        heads = cfg.decoder_attention_heads
        self.config = DecoderShape(
            cfg.decoder_layers, heads, cfg.d_model // heads, cfg.vocab_size, cfg.max_target_positions
        )
        self.attention = ATTENTION_BACKENDS["sdpa"]

    @property
    def whisper_config(self):
        return self.whisper.config

    @torch.inference_mode()
    def encode_inputs(self, inputs: list[torch.Tensor]) -> list[CrossKV]:
        """One batched encoder pass over the step's new windows; each request keeps its own copy of its keys and
        values, so that freeing one request frees its memory whatever the others do."""
        cross = self.whisper.cross_kv(self.whisper.encode(torch.stack(inputs)))
        return [[(k[i : i + 1].clone(), v[i : i + 1].clone()) for k, v in cross] for i in range(len(inputs))]

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        attend,
        last_only: bool = False,
        logits_indices: torch.Tensor | None = None,
        encoder_states: list[tuple[CrossKV, int]] | None = None,
    ) -> torch.Tensor:
        """token_ids, positions: (1, N). Returns float32 logits (1, R, V) for the rows asked for."""
        if encoder_states is None:
            raise ValueError("Whisper's decoder needs each sequence's encoder state (encoder_states)")
        model = self.whisper
        limit = model.config.max_target_positions
        if int(positions.max()) >= limit:
            raise ValueError(f"the decoder holds at most {limit} tokens; this step reaches {int(positions.max()) + 1}")
        x = model.embed_tokens(token_ids) + model.embed_positions[positions]
        segments, row = [], 0
        for state, count in encoder_states:
            segments.append((slice(row, row + count), state))
            row += count
        for index, layer in enumerate(model.decoder_layers):
            attn = layer.self_attn
            q, k, v = attn.qkv_proj(layer.self_attn_layer_norm(x)).chunk(3, dim=-1)
            out = attend(index, attn.split(q), attn.split(k), attn.split(v))  # paged: writes k, v to the cache
            x = x + attn.out_proj(attn.merge(out.to(x.dtype)))
            cross = layer.encoder_attn
            q = cross.split(cross.q_proj(layer.encoder_attn_layer_norm(x)))  # (1, H, N, hd)
            parts = []
            for rows, state in segments:  # each sequence's rows over its own request's keys and values
                cross_k, cross_v = state[index]
                parts.append(F.scaled_dot_product_attention(q[:, :, rows], cross_k, cross_v))
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
            x = x + cross.out_proj(cross.merge(out))
            x = x + layer.mlp(x)
        if last_only:
            x = x[:, -1:]
        elif logits_indices is not None:
            x = x[:, logits_indices]
        return vocabulary_logits(model.decoder_norm(x), model.embed_tokens.weight)

"""T5 (v1.0, v1.1, mT5, Flan-T5): a pre-norm encoder-decoder Transformer with relative position buckets.

No absolute positions: the first layer of each stack learns one bias per (bucket, head), bidirectional buckets in
the encoder and causal ones in the decoder, and every layer of that stack adds it to its attention scores
(cross-attention has none). Scores are not scaled by 1/sqrt(d). Norms are T5's RMS norm (no mean, no bias);
projections have no biases; the MLP is ReLU (v1.0) or gated GELU (v1.1, `feed_forward_proj: gated-gelu`). When the
head is tied to the embeddings (v1.0), the decoder output is scaled by d_model ** -0.5 before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.errors import ModelFormatError
from leanlm.models.encoder import ACTIVATIONS
from leanlm.models.seq2seq import (
    Attention,
    DecodeStep,
    EncoderDecoderLM,
    cross_attention,
    load_exact_state,
    self_attention,
)

MODEL_TYPES = ("t5", "mt5")
MAX_DECODER_POSITIONS = 4096  # T5 has no position table: a cap for the decoder cache's capacity


@dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    activation: str  # the MLP's function (gelu_new for gated-gelu, as transformers)
    gated: bool
    scale_decoder_outputs: bool
    pad_token_id: int
    eos_token_id: int
    decoder_start_token_id: int

    @classmethod
    def from_hf_dict(cls, raw: dict) -> T5Config:
        projection = raw.get("feed_forward_proj", "relu")
        parts = projection.split("-")
        gated = parts[0] == "gated"
        activation = "gelu_new" if projection == "gated-gelu" else parts[-1]
        if len(parts) > 2 or (len(parts) == 2 and not gated) or activation not in ACTIVATIONS:
            raise ModelFormatError(
                f"feed_forward_proj {projection!r} is not supported (use relu, gated-gelu or gated-<act>)."
            )
        # transformers: scale unless the config says the head is not tied (v1.1's configs say so);
        # newer configs spell the choice out as scale_decoder_outputs.
        scale = raw.get("scale_decoder_outputs", raw.get("tie_word_embeddings", True) is not False)
        try:
            pad = int(raw.get("pad_token_id", 0))
            layers = int(raw["num_layers"])
            return cls(
                vocab_size=int(raw["vocab_size"]),
                d_model=int(raw["d_model"]),
                d_kv=int(raw["d_kv"]),
                d_ff=int(raw["d_ff"]),
                num_layers=layers,
                num_decoder_layers=int(raw.get("num_decoder_layers") or layers),
                num_heads=int(raw["num_heads"]),
                relative_attention_num_buckets=int(raw.get("relative_attention_num_buckets", 32)),
                relative_attention_max_distance=int(raw.get("relative_attention_max_distance", 128)),
                layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-6)),
                activation=activation,
                gated=gated,
                scale_decoder_outputs=bool(scale),
                pad_token_id=pad,
                eos_token_id=int(raw.get("eos_token_id", 1)),
                decoder_start_token_id=int(raw.get("decoder_start_token_id", pad)),
            )
        except KeyError as exc:
            raise ModelFormatError(f"config.json lacks {exc.args[0]!r}, which a T5 model needs.") from exc


class T5Norm(nn.Module):
    """T5's layer norm: scale by the root mean square (in float32), no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


def relative_buckets(relative: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of each (key - query) distance: exact below buckets/2 (per side), logarithmic up to max_distance."""
    result = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        result += (relative > 0).long() * buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)  # a causal query only sees keys at or before it
    exact = buckets // 2
    far = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact) * (buckets - exact)).long()
    far = far.clamp(max=buckets - 1)
    return result + torch.where(distance < exact, distance, far)


class MLP(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.gated = config.gated
        self.wi = nn.Linear(config.d_model, (2 if config.gated else 1) * config.d_ff, bias=False)  # gate, up fused
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.wi(x).chunk(2, dim=-1)
            return self.wo(self.act(gate) * up)
        return self.wo(self.act(self.wi(x)))


class Block(nn.Module):
    def __init__(self, config: T5Config, decoder: bool):
        super().__init__()
        dim, heads, inner = config.d_model, config.num_heads, config.num_heads * config.d_kv
        self.self_attn_norm = T5Norm(dim, config.layer_norm_epsilon)
        self.self_attn = Attention(dim, heads, cross=False, bias=False, inner=inner)
        if decoder:
            self.encoder_attn_norm = T5Norm(dim, config.layer_norm_epsilon)
            self.encoder_attn = Attention(dim, heads, cross=True, bias=False, inner=inner)
        self.mlp_norm = T5Norm(dim, config.layer_norm_epsilon)
        self.mlp = MLP(config)


class T5Model(EncoderDecoderLM):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.heads, self.head_dim = config.num_heads, config.d_kv
        self.max_positions = MAX_DECODER_POSITIONS
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder_position_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.encoder_layers = nn.ModuleList(Block(config, decoder=False) for _ in range(config.num_layers))
        self.encoder_norm = T5Norm(config.d_model, config.layer_norm_epsilon)
        self.decoder_position_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.decoder_layers = nn.ModuleList(Block(config, decoder=True) for _ in range(config.num_decoder_layers))
        self.decoder_norm = T5Norm(config.d_model, config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def position_bias(self, table: nn.Embedding, relative: torch.Tensor, bidirectional: bool) -> torch.Tensor:
        """relative (..., T, S) key - query distances -> (..., H, T, S) additive scores."""
        cfg = self.config
        buckets = relative_buckets(
            relative, bidirectional, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        return table(buckets).movedim(-1, -3)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) source ids (padded, with attention_mask) -> (B, S, d_model)."""
        length = input_ids.shape[1]
        positions = torch.arange(length)
        bias = self.position_bias(self.encoder_position_bias, positions[None, :] - positions[:, None], True)[None]
        if attention_mask is not None and not bool(attention_mask.all()):
            pad = torch.zeros(attention_mask.shape, dtype=bias.dtype).masked_fill(attention_mask == 0, -math.inf)
            bias = bias + pad[:, None, None, :]  # (B, H, S, S)
        x = self.shared(input_ids)
        for layer in self.encoder_layers:
            attn = layer.self_attn
            q, k, v = attn.qkv_proj(layer.self_attn_norm(x)).chunk(3, dim=-1)
            out = F.scaled_dot_product_attention(attn.split(q), attn.split(k), attn.split(v), attn_mask=bias, scale=1.0)
            x = x + attn.out_proj(attn.merge(out))
            x = x + layer.mlp(layer.mlp_norm(x))
        return self.encoder_norm(x)

    def decoder_hidden(self, tokens: torch.Tensor, cache, step: DecodeStep) -> torch.Tensor:
        relative = torch.arange(step.end)[None, None, :] - step.positions[:, :, None]  # (R, T, end)
        bias = self.position_bias(self.decoder_position_bias, relative, False)  # (R, H, T, end)
        bias = bias.masked_fill(~step.causal, -math.inf)
        x = self.shared(tokens)
        for index, layer in enumerate(self.decoder_layers):
            attn = layer.self_attn
            q, k, v = attn.qkv_proj(layer.self_attn_norm(x)).chunk(3, dim=-1)
            out = self_attention(cache, index, step, attn.split(q), attn.split(k), attn.split(v), bias, scale=1.0)
            x = x + attn.out_proj(attn.merge(out))
            cross = layer.encoder_attn
            q = cross.split(cross.q_proj(layer.encoder_attn_norm(x)))
            x = x + cross.out_proj(cross.merge(cross_attention(cache, index, step, q, scale=1.0)))
            x = x + layer.mlp(layer.mlp_norm(x))
        return self.decoder_norm(x)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.d_model**-0.5
        return self.lm_head(hidden)


# ---- loading ----


def state_dict_from_hf(hf: dict[str, torch.Tensor], config: T5Config) -> dict[str, torch.Tensor]:
    """Our names from transformers' T5ForConditionalGeneration names (the head falls back to the embeddings)."""

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise ModelFormatError(f"the T5 checkpoint lacks {name}: is it a complete T5ForConditionalGeneration?")
        return hf[name]

    shared = hf.get("shared.weight", hf.get("encoder.embed_tokens.weight"))
    if shared is None:
        raise ModelFormatError("the T5 checkpoint has no shared.weight embeddings.")
    out = {
        "shared.weight": shared,
        "lm_head.weight": hf.get("lm_head.weight", shared),
        "encoder_norm.weight": get("encoder.final_layer_norm.weight"),
        "decoder_norm.weight": get("decoder.final_layer_norm.weight"),
        "encoder_position_bias.weight": get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        "decoder_position_bias.weight": get("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    }
    for side, count in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        for i in range(count):
            src, dst = f"{side}.block.{i}.layer.", f"{side}_layers.{i}."
            attn = f"{src}0.SelfAttention."
            out[dst + "self_attn_norm.weight"] = get(f"{src}0.layer_norm.weight")
            out[dst + "self_attn.qkv_proj.weight"] = torch.cat([get(f"{attn}{p}.weight") for p in "qkv"])
            out[dst + "self_attn.out_proj.weight"] = get(f"{attn}o.weight")
            mlp = 1
            if side == "decoder":
                cross = f"{src}1.EncDecAttention."
                out[dst + "encoder_attn_norm.weight"] = get(f"{src}1.layer_norm.weight")
                out[dst + "encoder_attn.q_proj.weight"] = get(f"{cross}q.weight")
                out[dst + "encoder_attn.kv_proj.weight"] = torch.cat([get(f"{cross}{p}.weight") for p in "kv"])
                out[dst + "encoder_attn.out_proj.weight"] = get(f"{cross}o.weight")
                mlp = 2
            dense = f"{src}{mlp}.DenseReluDense."
            out[dst + "mlp_norm.weight"] = get(f"{src}{mlp}.layer_norm.weight")
            if config.gated:
                out[dst + "mlp.wi.weight"] = torch.cat([get(f"{dense}wi_0.weight"), get(f"{dense}wi_1.weight")])
            else:
                out[dst + "mlp.wi.weight"] = get(f"{dense}wi.weight")
            out[dst + "mlp.wo.weight"] = get(f"{dense}wo.weight")
    return out


def build(config: T5Config, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> T5Model:
    return load_exact_state(T5Model, config, state, dtype, "T5")


def from_hf(raw_config: dict, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> T5Model:
    config = T5Config.from_hf_dict(raw_config)
    return build(config, state_dict_from_hf(weights, config), dtype)

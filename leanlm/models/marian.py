"""Marian (Helsinki-NLP opus-mt): a post-norm encoder-decoder Transformer for translation.

Token embeddings scaled by sqrt(d_model) (`scale_embedding`), fixed sinusoidal positions (sin over the first
half of the channels, cos over the second), post-norm layers (x = LN(x + sublayer(x))) with biases, no final
norm; the head is tied to the decoder embeddings and adds `final_logits_bias`. Decoding starts from the pad token
(`decoder_start_token_id`). The encoder layer is the encoders' post-norm layer (models/encoder.py); the decoder
runs over the shared encoder-decoder cache (models/seq2seq.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from leanlm.errors import ModelFormatError
from leanlm.models.encoder import ACTIVATIONS, EncoderConfig, EncoderLayer
from leanlm.models.seq2seq import (
    Attention,
    DecodeStep,
    EncoderDecoderLM,
    cross_attention,
    load_exact_state,
    padding_bias,
    self_attention,
)

MODEL_TYPES = ("marian",)


@dataclass(frozen=True)
class MarianConfig:
    vocab_size: int
    decoder_vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_position_embeddings: int
    activation_function: str
    scale_embedding: bool
    share_encoder_decoder_embeddings: bool
    pad_token_id: int
    eos_token_id: int
    decoder_start_token_id: int

    @classmethod
    def from_hf_dict(cls, raw: dict) -> MarianConfig:
        if raw.get("normalize_before") or raw.get("add_final_layer_norm"):
            raise ModelFormatError("This Marian config asks for pre-norm layers; leanlm runs opus-mt's post-norm ones.")
        activation = raw.get("activation_function", "swish")
        if activation not in ACTIVATIONS:
            raise ModelFormatError(
                f"activation_function {activation!r} is not supported (use {', '.join(ACTIVATIONS)})."
            )
        try:
            vocab = int(raw["vocab_size"])
            pad = int(raw["pad_token_id"])
            return cls(
                vocab_size=vocab,
                decoder_vocab_size=int(raw.get("decoder_vocab_size") or vocab),
                d_model=int(raw["d_model"]),
                encoder_layers=int(raw["encoder_layers"]),
                decoder_layers=int(raw["decoder_layers"]),
                encoder_attention_heads=int(raw["encoder_attention_heads"]),
                decoder_attention_heads=int(raw["decoder_attention_heads"]),
                encoder_ffn_dim=int(raw["encoder_ffn_dim"]),
                decoder_ffn_dim=int(raw["decoder_ffn_dim"]),
                max_position_embeddings=int(raw.get("max_position_embeddings", 512)),
                activation_function=activation,
                scale_embedding=bool(raw.get("scale_embedding", False)),
                share_encoder_decoder_embeddings=bool(raw.get("share_encoder_decoder_embeddings", True)),
                pad_token_id=pad,
                eos_token_id=int(raw.get("eos_token_id", 0)),
                decoder_start_token_id=int(raw.get("decoder_start_token_id", pad)),
            )
        except KeyError as exc:
            raise ModelFormatError(f"config.json lacks {exc.args[0]!r}, which a Marian model needs.") from exc

    def encoder_layer_config(self) -> EncoderConfig:
        return EncoderConfig(
            model_type="marian",
            vocab_size=self.vocab_size,
            hidden_size=self.d_model,
            num_layers=self.encoder_layers,
            num_heads=self.encoder_attention_heads,
            intermediate_size=self.encoder_ffn_dim,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=0,
            layer_norm_eps=1e-5,  # torch's LayerNorm default, as Marian's
            hidden_act=self.activation_function,
            pad_token_id=self.pad_token_id,
        )


def marian_positions(length: int, dim: int) -> torch.Tensor:
    """Marian's table: angle pos / 10000^(2*(j//2)/dim); sin of the even channels' angles, then cos of the odd."""
    pos = np.arange(length)[:, None] / np.power(10000, 2 * (np.arange(dim) // 2) / dim)[None, :]
    half = (dim + 1) // 2
    table = torch.empty(length, dim)
    table[:, :half] = torch.from_numpy(np.sin(pos[:, 0::2])).float()
    table[:, half:] = torch.from_numpy(np.cos(pos[:, 1::2])).float()
    return table


class DecoderLayer(nn.Module):
    def __init__(self, config: MarianConfig):
        super().__init__()
        dim, heads = config.d_model, config.decoder_attention_heads
        self.self_attn = Attention(dim, heads, cross=False)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn = Attention(dim, heads, cross=True)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.act = ACTIVATIONS[config.activation_function]


class MarianModel(EncoderDecoderLM):
    def __init__(self, config: MarianConfig):
        super().__init__()
        self.config = config
        dim = config.d_model
        self.heads, self.head_dim = config.decoder_attention_heads, dim // config.decoder_attention_heads
        self.max_positions = config.max_position_embeddings
        self.embed_scale = math.sqrt(dim) if config.scale_embedding else 1.0
        self.encoder_embed = nn.Embedding(config.vocab_size, dim)
        self.decoder_embed = nn.Embedding(config.decoder_vocab_size, dim)
        self.register_buffer("positions", marian_positions(config.max_position_embeddings, dim), persistent=True)
        layer_config = config.encoder_layer_config()
        self.encoder_layers = nn.ModuleList(EncoderLayer(layer_config) for _ in range(config.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.lm_head = nn.Linear(dim, config.decoder_vocab_size, bias=False)
        self.register_buffer("final_logits_bias", torch.zeros(config.decoder_vocab_size), persistent=True)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) source ids (padded, with attention_mask) -> (B, S, d_model)."""
        length = input_ids.shape[1]
        if length > self.max_positions:
            raise ValueError(f"the source has {length} tokens; this Marian model reads at most {self.max_positions}")
        x = self.encoder_embed(input_ids) * self.embed_scale + self.positions[:length]
        mask = padding_bias(attention_mask)
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return x

    def decoder_hidden(self, tokens: torch.Tensor, cache, step: DecodeStep) -> torch.Tensor:
        x = self.decoder_embed(tokens) * self.embed_scale + self.positions[step.positions]
        for index, layer in enumerate(self.decoder_layers):
            attn = layer.self_attn
            q, k, v = attn.qkv_proj(x).chunk(3, dim=-1)
            out = self_attention(cache, index, step, attn.split(q), attn.split(k), attn.split(v))
            x = layer.self_attn_layer_norm(x + attn.out_proj(attn.merge(out)))
            cross = layer.encoder_attn
            out = cross_attention(cache, index, step, cross.split(cross.q_proj(x)))
            x = layer.encoder_attn_layer_norm(x + cross.out_proj(cross.merge(out)))
            x = layer.final_layer_norm(x + layer.fc2(layer.act(layer.fc1(x))))
        return x

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden) + self.final_logits_bias


# ---- loading ----


def state_dict_from_hf(hf: dict[str, torch.Tensor], config: MarianConfig) -> dict[str, torch.Tensor]:
    """Our names from transformers' MarianMTModel names (the `model.` prefix optional; tied tensors may be absent)."""
    hf = {name.removeprefix("model."): tensor for name, tensor in hf.items()}

    def first(*names: str) -> torch.Tensor:
        for name in names:
            if name in hf:
                return hf[name]
        raise ModelFormatError(f"the Marian checkpoint has none of {names}: is it a complete MarianMTModel?")

    decoder_embed = first("decoder.embed_tokens.weight", "shared.weight")
    out = {
        "encoder_embed.weight": first("encoder.embed_tokens.weight", "shared.weight"),
        "decoder_embed.weight": decoder_embed,
        "lm_head.weight": hf.get("lm_head.weight", decoder_embed),
        "final_logits_bias": hf.get("final_logits_bias", torch.zeros(1, config.decoder_vocab_size)).reshape(-1),
        "positions": marian_positions(config.max_position_embeddings, config.d_model),
    }

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise ModelFormatError(f"the Marian checkpoint lacks {name}: is it a complete MarianMTModel?")
        return hf[name]

    for i in range(config.encoder_layers):
        src, dst = f"encoder.layers.{i}.", f"encoder_layers.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}qkv.{part}"] = torch.cat([get(f"{src}self_attn.{p}_proj.{part}") for p in "qkv"])
            for ours, theirs in (
                ("attn_out", "self_attn.out_proj"),
                ("attn_norm", "self_attn_layer_norm"),
                ("up", "fc1"),
                ("down", "fc2"),
                ("mlp_norm", "final_layer_norm"),
            ):
                out[f"{dst}{ours}.{part}"] = get(f"{src}{theirs}.{part}")
    for i in range(config.decoder_layers):
        src, dst = f"decoder.layers.{i}.", f"decoder_layers.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}self_attn.qkv_proj.{part}"] = torch.cat([get(f"{src}self_attn.{p}_proj.{part}") for p in "qkv"])
            out[f"{dst}encoder_attn.kv_proj.{part}"] = torch.cat(
                [get(f"{src}encoder_attn.{p}_proj.{part}") for p in "kv"]
            )
            for name in (
                "self_attn.out_proj",
                "self_attn_layer_norm",
                "encoder_attn.q_proj",
                "encoder_attn.out_proj",
                "encoder_attn_layer_norm",
                "fc1",
                "fc2",
                "final_layer_norm",
            ):
                out[f"{dst}{name}.{part}"] = get(f"{src}{name}.{part}")
    return out


def build(config: MarianConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> MarianModel:
    return load_exact_state(MarianModel, config, state, dtype, "Marian")


def from_hf(raw_config: dict, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> MarianModel:
    config = MarianConfig.from_hf_dict(raw_config)
    return build(config, state_dict_from_hf(weights, config), dtype)

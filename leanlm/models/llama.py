"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2): RMSNorm, RoPE, grouped-query attention, SwiGLU.

Self-contained: config parsing (HF and GGUF), the module tree, the layer description the C++ stack and compress/
read, and how HF and GGUF tensor names map onto it. q/k/v and gate/up are fused into one matrix each, so a decode
step dispatches two matmuls fewer per layer. Mistral's sliding window and Qwen2's optional one are honoured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.config import ModelConfig
from leanlm.layers.attention import self_attention
from leanlm.layers.quantized_tensor import QuantizedTensor
from leanlm.layers.rope import apply_rotary
from leanlm.models.base import (
    ForwardContext,
    RMSNorm,
    RotaryTable,
    gguf_block_name,
    hf_block_name,
    strip_prefix,
    zeros_embedding,
)
from leanlm.models.causal_lm import CausalLM
from leanlm.models.family import Family, LayerSpec, ModelSpec


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: LayerSpec, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.window = layer.window
        self.qkv_proj = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=layer.qkv_bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=False)
        self.fused = False

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, length, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qkv = qkv.transpose(1, 2)  # (B, H + 2 H_kv, T, D)
        rotated_heads = self.num_heads + self.num_kv_heads
        rotate = torch.ops.leanlm.rotary if self.fused else apply_rotary
        qk = rotate(qkv[:, :rotated_heads], ctx.cos, ctx.sin)  # one rotation for q and k together
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, rotated_heads:]
        out = ctx.attend(self.layer_index, q, k, v, window=self.window).to(x.dtype)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: LayerSpec):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=layer.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=layer.mlp_bias)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.down_proj(torch.ops.leanlm.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: LayerSpec, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(CausalLM):
    fused_module_types = (RMSNorm, MLP, Attention)

    def __init__(self, config: ModelConfig):
        super().__init__(config, describe(config))
        self.embed_tokens = zeros_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, spec, i) for i, spec in enumerate(self.spec.layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryTable(config.head_dim, config.rope_theta, config.rope_scaling, config.context_length)

    def forward_context(self, positions: torch.Tensor, dtype: torch.dtype, attend: Callable | None = None):
        return ForwardContext([self.rotary(positions, dtype)], attend or self_attention(self.attention))

    def load_weights(self, weights: dict[str, torch.Tensor | QuantizedTensor], dtype: torch.dtype) -> None:
        weights = strip_prefix(weights)
        if (factors := weights.pop("rope_freq_factors", None)) is not None:
            # Llama 3.x GGUF files store their rope scaling as per-frequency divisors instead of metadata.
            self.rotary.inv_freq = self.rotary.inv_freq / factors.float().cpu()
        super().load_weights(weights, dtype)


# ---- the family's description ----------------------------------------------------------------------------------


def describe(config: ModelConfig) -> ModelSpec:
    scaling = tuple(sorted(config.rope_scaling.items())) if config.rope_scaling else None
    windows = _layer_windows(config)
    layers = tuple(
        LayerSpec(
            qkv_bias=config.attention_bias,
            mlp_bias=config.mlp_bias,
            window=window,
            rope_theta=config.rope_theta,
            rope_scaling=scaling,
        )
        for window in windows
    )
    return ModelSpec(layers, tied_head=config.tie_word_embeddings)


def _layer_windows(config: ModelConfig) -> list[int | None]:
    """Per-layer sliding windows from HF's keys: `layer_types` when given, else Mistral's `sliding_window` on every
    layer, or Qwen2's `use_sliding_window` from layer `max_window_layers` on."""
    extra, n = config.extra, config.num_layers
    window = extra.get("sliding_window")
    if not window:
        return [None] * n
    if types := extra.get("layer_types"):
        return [window if kind == "sliding_attention" else None for kind in types]
    if config.model_type == "qwen2":
        if not extra.get("use_sliding_window", False):
            return [None] * n
        first = int(extra.get("max_window_layers", n))
        return [window if i >= first else None for i in range(n)]
    return [int(window)] * n


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw.get("model_type") or "llama"
    return ModelConfig.from_hf_dict(
        raw, model_type=model_type, attention_bias=bool(raw.get("attention_bias", model_type == "qwen2"))
    )


def config_from_gguf(meta: dict[str, Any]) -> ModelConfig:
    arch = meta["general.architecture"]
    extra = {}
    if window := meta.get(f"{arch}.attention.sliding_window"):
        extra["sliding_window"] = int(window)
    return ModelConfig.from_gguf_metadata(meta, model_type=arch, attention_bias=arch == "qwen2", extra=extra)


# GGUF tensor names -> HF names (per-layer ones without the "blk.N." prefix).
GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "rope_freqs": "rope_freq_factors",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name_from_gguf(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for tensors leanlm derives itself."""
    hf = gguf_block_name(name, GGUF_NAMES)
    return "rope_freq_factors" if hf == "rope_freq_factors.weight" else hf


def gguf_name_from_hf(name: str) -> str | None:
    return hf_block_name(name, GGUF_NAMES)


def _permuted_heads(name: str, config: ModelConfig, arch: str) -> int | None:
    # llama.cpp's converter permutes q/k rows of "llama" models for its interleaved rope; qwen2 keeps HF's layout.
    if arch not in ("llama", "mistral"):
        return None
    if ".q_proj." in name:
        return config.num_heads
    return config.num_kv_heads if ".k_proj." in name else None


def tensor_from_gguf(name: str, tensor: Any, config: ModelConfig, arch: str) -> Any:
    heads = _permuted_heads(name, config, arch)
    return tensor if heads is None else _map_rows(tensor, lambda t: unpermute_gguf_rope(t, heads))


def tensor_to_gguf(name: str, tensor: Any, config: ModelConfig, arch: str) -> Any:
    heads = _permuted_heads(name, config, arch)
    return tensor if heads is None else _map_rows(tensor, lambda t: permute_gguf_rope(t, heads))


def _map_rows(tensor: Any, fn: Callable) -> Any:
    return tensor.map_rows(fn) if isinstance(tensor, QuantizedTensor) else fn(tensor)


def unpermute_gguf_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter interleaves q/k rows for its rope layout; undo it to get HF's rotate-half layout."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def permute_gguf_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of unpermute_gguf_rope: HF's rotate-half rows back to llama.cpp's interleaved layout."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    gguf_architectures=("llama", "mistral", "qwen2"),
    model_class=LlamaForCausalLM,
    config_from_hf=config_from_hf,
    config_from_gguf=config_from_gguf,
    describe=describe,
    hf_name_from_gguf=hf_name_from_gguf,
    gguf_name_from_hf=gguf_name_from_hf,
    tensor_from_gguf=tensor_from_gguf,
    tensor_to_gguf=tensor_to_gguf,
)

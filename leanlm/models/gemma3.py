"""Gemma 3 (text): sliding-window and global layers, query/key norms, GeGLU, (1 + w) RMSNorm with norms before and
after both attention and MLP, scaled embeddings, a tied head and Gemma's turn format.

Self-contained like models/llama.py: config parsing (HF `gemma3_text` and GGUF `gemma3`), modules, the layer
description, tensor names and values both ways (llama.cpp stores norm weights as 1 + w).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.config import ModelConfig
from leanlm.layers.attention import self_attention
from leanlm.layers.rope import apply_rotary
from leanlm.models.base import (
    ForwardContext,
    RMSNorm,
    RotaryTable,
    gguf_block_name,
    hf_block_name,
    zeros_embedding,
)
from leanlm.models.causal_lm import CausalLM
from leanlm.models.family import Family, LayerSpec, ModelSpec

DEFAULT_LOCAL_THETA = 10_000.0  # sliding layers' rope base when the checkpoint does not say (llama.cpp's too)
SLIDING_PATTERN = 6  # every 6th layer is global, the others slide (GGUF files do not store the pattern)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: LayerSpec, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.window, self.scale = layer.window, layer.attention_scale
        self.rope_index = 0 if layer.window is None else 1
        self.qkv_proj = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=layer.qkv_bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, offset=1.0)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, offset=1.0)
        self.fused = False

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, length, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qkv = qkv.transpose(1, 2)  # (B, H + 2 H_kv, T, D)
        q = self.q_norm(qkv[:, : self.num_heads])
        k = self.k_norm(qkv[:, self.num_heads : self.num_heads + self.num_kv_heads])
        v = qkv[:, self.num_heads + self.num_kv_heads :]
        cos, sin = ctx.rope[self.rope_index]
        rotate = torch.ops.leanlm.rotary if self.fused else apply_rotary
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = ctx.attend(self.layer_index, q, k, v, scale=self.scale, window=self.window).to(x.dtype)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: LayerSpec, layer_index: int):
        super().__init__()
        norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.self_attn = Attention(config, layer, layer_index)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(CausalLM):
    fused_module_types = (RMSNorm, Attention)

    def __init__(self, config: ModelConfig):
        super().__init__(config, describe(config))
        self.embed_tokens = zeros_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, spec, i) for i, spec in enumerate(self.spec.layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        global_layer = next((s for s in self.spec.layers if s.window is None), self.spec.layers[0])
        local_layer = next((s for s in self.spec.layers if s.window is not None), global_layer)
        # rope tables: [0] for global layers, [1] for sliding ones
        self.rotary = nn.ModuleList(
            RotaryTable(
                config.head_dim, s.rope_theta, dict(s.rope_scaling) if s.rope_scaling else None, config.context_length
            )
            for s in (global_layer, local_layer)
        )

    def forward_context(self, positions: torch.Tensor, dtype: torch.dtype, attend: Callable | None = None):
        tables = [table(positions, dtype) for table in self.rotary]
        return ForwardContext(tables, attend or self_attention(self.attention))


# ---- the family's description ----------------------------------------------------------------------------------


def _layer_types(config: ModelConfig) -> list[str]:
    if types := config.extra.get("layer_types"):
        return list(types)
    pattern = int(config.extra.get("sliding_window_pattern", SLIDING_PATTERN))
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(config.num_layers)]


def _rope(config: ModelConfig, layer_type: str) -> tuple[float, tuple | None]:
    params = (config.extra.get("rope_parameters") or {}).get(layer_type)
    if params:  # transformers 5: one rope dict per layer type
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        return float(params["rope_theta"]), None if kind == "default" else tuple(sorted(scaling.items()))
    if layer_type == "sliding_attention":
        return float(config.extra.get("rope_local_base_freq", DEFAULT_LOCAL_THETA)), None
    scaling = config.rope_scaling
    return config.rope_theta, tuple(sorted(scaling.items())) if scaling else None


def describe(config: ModelConfig) -> ModelSpec:
    extra = config.extra
    scalar = float(extra.get("query_pre_attn_scalar", config.head_dim))
    window = int(extra.get("sliding_window", 4096))
    layers = []
    for kind in _layer_types(config):
        theta, scaling = _rope(config, kind)
        layers.append(
            LayerSpec(
                norm_offset=1.0,
                activation="gelu_tanh",
                qk_norm=True,
                sandwich_norms=True,
                qkv_bias=config.attention_bias,
                window=window if kind == "sliding_attention" else None,
                rope_theta=theta,
                rope_scaling=scaling,
                attention_scale=scalar**-0.5,
                attention_softcap=extra.get("attn_logit_softcapping"),
            )
        )
    return ModelSpec(
        tuple(layers),
        embedding_scale=config.hidden_size**0.5,
        logit_softcap=extra.get("final_logit_softcapping"),
        tied_head=True,
    )


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    if raw.get("model_type") == "gemma3" and "text_config" in raw:  # the multimodal wrapper: its text model
        raw = {**raw["text_config"], "model_type": "gemma3_text"}
    if (act := raw.get("hidden_activation", "gelu_pytorch_tanh")) != "gelu_pytorch_tanh":
        from leanlm.errors import UnsupportedArchitectureError

        raise UnsupportedArchitectureError(f"Gemma 3 with hidden_activation '{act}' is not implemented.")
    if raw.get("attn_logit_softcapping"):
        from leanlm.errors import UnsupportedArchitectureError

        raise UnsupportedArchitectureError("Gemma 3 with attention logit soft-capping is not implemented.")
    return ModelConfig.from_hf_dict(
        raw,
        model_type="gemma3_text",
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=True,
        context_length=int(raw.get("max_position_embeddings", 131_072)),
    )


def config_from_gguf(meta: dict[str, Any]) -> ModelConfig:
    head_dim = int(meta.get("gemma3.attention.key_length", 256))
    extra = {
        "model_type": "gemma3_text",
        "sliding_window": int(meta.get("gemma3.attention.sliding_window", 4096)),
        "rope_local_base_freq": DEFAULT_LOCAL_THETA,
        "query_pre_attn_scalar": head_dim,  # what llama.cpp assumes for every size but 27B
        "hidden_activation": "gelu_pytorch_tanh",
    }
    return ModelConfig.from_gguf_metadata(meta, model_type="gemma3_text", tie_word_embeddings=True, extra=extra)


GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def tensor_from_gguf(name: str, tensor: Any, config: ModelConfig, arch: str) -> Any:
    # llama.cpp's converter stores Gemma's norm weights as 1 + w, the factor itself
    return tensor - 1.0 if name.endswith("norm.weight") else tensor


def tensor_to_gguf(name: str, tensor: Any, config: ModelConfig, arch: str) -> Any:
    return tensor + 1.0 if name.endswith("norm.weight") else tensor


# Gemma's turn format (the GGUF carries no template): system text opens the first user turn; "model" answers.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_text = messages[0]['content'] + '\\n\\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set system_text = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{{ (system_text if loop.first else '') + (message['content'] | trim) }}"
    "{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


FAMILY = Family(
    name="gemma3",
    model_types=("gemma3_text", "gemma3"),
    hf_architectures=("Gemma3ForCausalLM",),
    gguf_architectures=("gemma3",),
    model_class=Gemma3ForCausalLM,
    config_from_hf=config_from_hf,
    config_from_gguf=config_from_gguf,
    describe=describe,
    hf_name_from_gguf=lambda name: gguf_block_name(name, GGUF_NAMES),
    gguf_name_from_hf=lambda name: hf_block_name(name, GGUF_NAMES),
    tensor_from_gguf=tensor_from_gguf,
    tensor_to_gguf=tensor_to_gguf,
    chat_template=CHAT_TEMPLATE,
)

"""The contract between a model family module and the rest of leanlm.

A family module (models/llama.py, models/gemma3.py, ...) owns everything about its architecture: parsing its
HF config and GGUF metadata, its tensor names both ways, its modules, and a declarative description of its
layers (`ModelSpec`). The loader, the GGUF writer, compress/ and the C++ stack builder read the description and
the name maps; none of them knows a family's internals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from leanlm.config import ModelConfig


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer computes, as far as anything outside the family needs to know."""

    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight): 1.0 for Gemma, 0.0 for Llama
    activation: str = "silu"  # gate activation of the gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE
    sandwich_norms: bool = False  # extra norms after attention and after the MLP (Gemma 2/3)
    qkv_bias: bool = False
    mlp_bias: bool = False
    window: int | None = None  # sliding-window attention: a query sees its `window` latest keys, itself included
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the HF rope_scaling dict
    attention_scale: float = 0.0  # multiplies q.k; 0 means head_dim ** -0.5
    attention_softcap: float | None = None  # tanh soft-capping of attention scores


@dataclass(frozen=True)
class ModelSpec:
    layers: tuple[LayerSpec, ...]
    embedding_scale: float | None = None  # token embeddings are multiplied by it (Gemma: sqrt(hidden_size))
    logit_softcap: float | None = None  # final logits = cap * tanh(logits / cap)
    tied_head: bool = False

    @property
    def uniform(self) -> bool:
        return len(set(self.layers)) <= 1

    def beyond_llama(self, head_dim: int) -> list[str]:
        """What these layers compute beyond Llama's pre-norm RMSNorm / attention / SwiGLU layer (windows aside):
        code written for Llama's layer (the C++ stack, AWQ's folding, structured pruning) must refuse these."""
        checks = (
            ("a norm offset", lambda layer: layer.norm_offset != 0.0),
            ("an activation other than silu", lambda layer: layer.activation != "silu"),
            ("query/key norms", lambda layer: layer.qk_norm),
            ("post-attention and post-MLP norms", lambda layer: layer.sandwich_norms),
            (
                "an attention scale other than 1/sqrt(head_dim)",
                lambda layer: layer.attention_scale not in (0.0, head_dim**-0.5),
            ),
            ("attention soft-capping", lambda layer: layer.attention_softcap is not None),
        )
        return [what for what, present in checks if any(present(layer) for layer in self.layers)]


@dataclass(frozen=True)
class Family:
    """One architecture family. Registered in models/registry.py."""

    name: str
    model_types: tuple[str, ...]  # HF `model_type` values it reads
    hf_architectures: tuple[str, ...]  # HF `architectures` entries, for configs without model_type
    gguf_architectures: tuple[str, ...]  # GGUF `general.architecture` values
    model_class: type[nn.Module]
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_from_gguf: Callable[[dict[str, Any]], ModelConfig]
    describe: Callable[[ModelConfig], ModelSpec]
    # GGUF tensor name -> HF name (None: a tensor leanlm derives itself), and the inverse
    hf_name_from_gguf: Callable[[str], str | None]
    gguf_name_from_hf: Callable[[str], str | None]
    # Tensor values as stored in GGUF -> as HF stores them (row permutations, norm offsets), and the inverse
    tensor_from_gguf: Callable[[str, Any, ModelConfig, str], Any] = field(default=lambda name, t, config, arch: t)
    tensor_to_gguf: Callable[[str, Any, ModelConfig, str], Any] = field(default=lambda name, t, config, arch: t)
    chat_template: str | None = None  # used when the checkpoint carries none

"""Pieces every decoder family shares: RMSNorm, rotary tables, the per-forward context, weight assignment."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.errors import ModelFormatError
from leanlm.layers.quantized_linear import QuantizedLinear
from leanlm.layers.quantized_tensor import QuantizedTensor
from leanlm.layers.rope import inverse_frequencies


@dataclass
class ForwardContext:
    """What every layer of one forward pass shares."""

    rope: list[tuple[torch.Tensor, torch.Tensor]]  # per rotary table: cos, sin (B, 1, T, D)
    # attend(layer_index, q, k, v, scale=, window=) stores k/v where the caller keeps them and attends: the
    # engine's paged attention, a contiguous cache's (KVCache.attention), or self_attention (no cache).
    attend: Callable

    @property
    def cos(self) -> torch.Tensor:
        return self.rope[0][0]

    @property
    def sin(self) -> torch.Tensor:
        return self.rope[0][1]


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight); Gemma stores weights around 0 and uses offset 1."""

    def __init__(self, size: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size) if offset else torch.ones(size))
        self.eps, self.offset = eps, offset
        self.fused = False  # leanlm's one-call kernel (float32 CPU); see set_fused_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + self.offset if self.offset else self.weight
        if self.fused:
            return torch.ops.leanlm.rms_norm(x, weight, self.eps)
        return F.rms_norm(x, weight.shape, weight, self.eps)


class RotaryTable(nn.Module):
    """cos/sin for given positions, computed per forward from inverse frequencies (no table to outgrow)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, context_length: int):
        super().__init__()
        inv_freq, self.scale = inverse_frequencies(head_dim, theta, scaling, context_length, context_length)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.unsqueeze(-1).float() * self.inv_freq.to(positions.device)  # (B, T, D/2)
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # (B, 1, T, D), rotate-half layout
        return (angles.cos() * self.scale).to(dtype), (angles.sin() * self.scale).to(dtype)


def zeros_embedding(vocab_size: int, hidden_size: int) -> nn.Embedding:
    # An explicit weight skips the random init, whose meta-device path imports torch._dynamo (~2 s); zeros, never
    # torch.empty, so that a model built off the meta device never computes on uninitialized memory.
    return nn.Embedding(vocab_size, hidden_size, _weight=torch.zeros(vocab_size, hidden_size))


def assign_weights(model: nn.Module, weights: dict, dtype: torch.dtype) -> dict:
    """Fuse q/k/v and gate/up, turn QuantizedTensor weights into QuantizedLinear modules, check every parameter is
    present with the right shape, and assign. `weights` uses the model's own names (no "model." prefix)."""
    if "embed_tokens.weight" not in weights:
        raise ModelFormatError("The checkpoint has no token embedding; it is incomplete.")
    weights.setdefault("lm_head.weight", weights["embed_tokens.weight"])  # tied embeddings
    if isinstance(weights["embed_tokens.weight"], QuantizedTensor):  # a lookup table must be dense
        weights["embed_tokens.weight"] = weights["embed_tokens.weight"].dequantize(dtype)
    fused = fuse_projections(weights)
    quantized = {name.removesuffix(".weight"): t for name, t in fused.items() if isinstance(t, QuantizedTensor)}
    for module_name, weight in quantized.items():
        bias = fused.get(f"{module_name}.bias")  # stays in `fused`: the layer's bias is a parameter checked below
        model.set_submodule(module_name, QuantizedLinear(weight, bias))
        del fused[f"{module_name}.weight"]
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(fused))
    if missing:
        raise ModelFormatError(
            f"The checkpoint lacks {len(missing)} tensors, e.g. '{missing[0]}'. "
            "The file is incomplete or belongs to another architecture."
        )
    for name, param in expected.items():
        if fused[name].shape != param.shape:
            raise ModelFormatError(
                f"Tensor '{name}' has shape {tuple(fused[name].shape)} but the config implies "
                f"{tuple(param.shape)}. config and weights disagree."
            )
    model.load_state_dict(fused, strict=False, assign=True)
    if "lm_head" not in quantized and fused["lm_head.weight"] is fused["embed_tokens.weight"]:
        model.lm_head.weight = model.embed_tokens.weight
    return fused


def fuse_projections(weights: dict) -> dict:
    """q/k/v -> qkv_proj and gate/up -> gate_up_proj (rows stacked), for dense and quantized weights alike."""
    fused = {}
    for name, tensor in weights.items():
        match = re.fullmatch(r"layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|gate|up)_proj\.(weight|bias)", name)
        if not match:
            fused[name] = tensor
            continue
        layer, block, proj, kind = match.groups()
        parts = ("q", "k", "v") if block == "self_attn" else ("gate", "up")
        if proj != parts[0]:
            continue
        target = "qkv_proj" if block == "self_attn" else "gate_up_proj"
        sources = [f"layers.{layer}.{block}.{p}_proj.{kind}" for p in parts]
        missing = [s for s in sources if s not in weights]
        if missing:
            raise ModelFormatError(f"The checkpoint lacks {missing[0]}; it is incomplete.")
        tensors = [weights[s] for s in sources]
        if all(isinstance(t, QuantizedTensor) for t in tensors) and QuantizedTensor.common_form(tensors):
            # mixed block types (a Q4_K_M file's Q4_K q/k beside a Q6_K v) stack in one exact common form
            fused[f"layers.{layer}.{block}.{target}.{kind}"] = QuantizedTensor.cat(tensors)
        else:  # dense beside quantized: run the fused matrix dense
            dense = [t.dequantize() if isinstance(t, QuantizedTensor) else t for t in tensors]
            fused[f"layers.{layer}.{block}.{target}.{kind}"] = torch.cat([t.to(dense[0].dtype) for t in dense])
    return fused


def strip_prefix(weights: dict) -> dict:
    """HF names ("model.layers.0...") -> the module tree's ("layers.0..."); drops tensors leanlm recomputes."""
    return {
        name.removeprefix("model."): tensor
        for name, tensor in weights.items()
        if not name.endswith("rotary_emb.inv_freq")
    }


def gguf_block_name(name: str, names: dict[str, str]) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' through a family's short-name map."""
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if match:
        layer, short, kind = match.groups()
        return f"model.layers.{layer}.{names[short]}.{kind}" if short in names else None
    stem, _, kind = name.rpartition(".")
    return f"{names[stem]}.{kind}" if stem in names else None


def hf_block_name(name: str, names: dict[str, str]) -> str | None:
    """The inverse of gguf_block_name."""
    inverse = {hf: short for short, hf in names.items()}
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if match:
        layer, path, kind = match.groups()
        return f"blk.{layer}.{inverse[path]}.{kind}" if path in inverse else None
    stem, _, kind = name.rpartition(".")
    return f"{inverse[stem]}.{kind}" if stem in inverse else None

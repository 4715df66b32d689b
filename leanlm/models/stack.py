"""Builds and runs the C++ DecoderStack (kernels/csrc/decoder_stack.cpp): every decoder layer of one engine step in
one call. The stack implements one layer function (pre-norm RMSNorm, RoPE, full causal grouped-query attention,
SwiGLU); it runs a model only when the model's description (`model.spec`) is exactly that, and says why not
otherwise, so it never computes a different function than the module path.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlm.layers.half_linear import HalfLinear
from leanlm.layers.quantized_linear import QuantizedLinear
from leanlm.models.family import ModelSpec


def stack_refusal(spec: ModelSpec, head_dim: int) -> str | None:
    """Why the C++ stack cannot run layers described by `spec` (None: it can)."""
    unsupported = [] if spec.uniform else ["layers that differ from each other"]
    unsupported += spec.beyond_llama(head_dim)
    if any(layer.window is not None for layer in spec.layers):
        unsupported.append("sliding-window attention")
    return f"the C++ stack does not implement {', '.join(unsupported)}" if unsupported else None


def refresh_decoder_stack(model: nn.Module) -> None:
    """(Re)build the stack over the model's current kernel layouts (registry.prepare_runtime calls this)."""
    model.decoder_stack, model.decoder_stack_refusal = (None, "fused ops are off")
    if model.fused_ops:
        model.decoder_stack, model.decoder_stack_refusal = build_decoder_stack(model)


def run_decoder_stack(model: nn.Module, x: torch.Tensor, ctx, positions: torch.Tensor) -> torch.Tensor | None:
    """All layers of an engine step through the stack (same bits as the module path), or None when it cannot."""
    if model.decoder_stack is None and model.fused_ops and model.decoder_stack_refusal is None:
        refresh_decoder_stack(model)  # a copy of the model (deepcopy, pickle) builds its own
    attend = ctx.attend
    if model.decoder_stack is None or model.attention_name != "sdpa" or not hasattr(attend, "layout"):
        return None
    layout = attend.layout()
    if not x.dtype == layout.keys.dtype == torch.float32:
        return None
    cos, sin = ctx.rope[0]
    out = model.decoder_stack.forward(x[0], cos[0, 0], sin[0, 0], *layout[:4], layout.row_sequence, positions[0])
    return out[None]


def build_decoder_stack(model: nn.Module):
    """(stack, None) when every projection runs leanlm's kernels with the same activation mode, every layer has the
    config's shapes, and the description is one the stack implements; (None, reason) otherwise."""
    config = model.config
    if reason := stack_refusal(model.spec, config.head_dim):
        return None, reason
    shapes = (config.q_size + 2 * config.kv_size, config.hidden_size, 2 * config.intermediate_size, config.hidden_size)
    # Tensor parallelism (distributed/) wraps o/down in an all-reduce: the stack runs the layer inside and sums
    # its output over the ranks of `model.all_reduce_group` itself.
    group = getattr(model, "all_reduce_group", None)
    projections = [
        (layer.self_attn.qkv_proj, _inner(layer.self_attn.o_proj, group), layer.mlp.gate_up_proj,
         _inner(layer.mlp.down_proj, group))
        for layer in model.layers
    ]  # fmt: skip
    flat = [p for layer in projections for p in layer]
    if not flat or not all(_on_kernels(p) for p in flat):
        return None, "some projections do not run leanlm's kernels"
    # one activation mode: "auto" (int8 activations for quantized weights, bfloat16 for bfloat16 ones) or "exact"
    modes = {p.round_activations if isinstance(p, HalfLinear) else p._int8_activations for p in flat}
    norms = [(layer.input_layernorm.weight, layer.post_attention_layernorm.weight) for layer in model.layers]
    if len(modes) != 1:
        return None, "the projections mix int8 and float activations"
    if any(tuple(p.out_features for p in linears) != shapes for linears in projections):
        return None, "some layers have other shapes than the config's"
    if any(w.dtype != torch.float32 for pair in norms for w in pair):
        return None, "the norms are not float32"
    stack = torch.classes.leanlm.DecoderStack(
        config.num_heads, config.num_kv_heads, config.head_dim, config.rms_norm_eps, config.head_dim**-0.5, *modes
    )
    if group is not None:
        stack.set_all_reduce_group(group)
    none = torch.empty(0)
    for (input_norm, post_norm), linears in zip(norms, projections, strict=True):
        tensors, rows, segments = [], [], []
        for linear in linears:
            bias = linear.bias.detach().float() if linear.bias is not None else none
            if isinstance(linear, HalfLinear):  # the 16-bit matrix itself, shared with the module (no copy)
                tensors += [linear.weight.detach(), none, none, bias, none, none]
                rows.append(linear.out_features)
                segments.append(1)
                continue
            parts = linear._packed.segments()  # a fused q/k/v of mixed types: row segments in their own layouts
            start = 0
            for part in parts:
                codes, scales, offsets, scale_base, offset_base = (none if t is None else t for t in part.tensors())
                part_bias = bias[start : start + part.rows] if bias.numel() else none
                tensors += [codes, scales, offsets, part_bias, scale_base, offset_base]
                rows.append(part.rows)
                start += part.rows
            segments.append(len(parts))
        stack.add_layer_segments(input_norm.detach(), post_norm.detach(), tensors, rows, segments)
    return stack, None


def _on_kernels(linear: nn.Module) -> bool:
    if isinstance(linear, HalfLinear):
        return linear.half_kernel and linear.weight.is_contiguous()
    return isinstance(linear, QuantizedLinear) and linear.kernel.startswith("leanlm")


def _inner(linear: nn.Module, group: str | None) -> nn.Module:
    """The layer a row-parallel wrapper (one with `inner`) runs, when the stack does that wrapper's all-reduce."""
    return linear.inner if group is not None and hasattr(linear, "inner") else linear

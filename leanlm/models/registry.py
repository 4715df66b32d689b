"""The families leanlm implements, looked up by HF model_type, HF architecture or GGUF architecture."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from leanlm.config import ModelConfig
from leanlm.errors import UnsupportedArchitectureError
from leanlm.layers.half_linear import half_weight_ids, use_half_kernels
from leanlm.layers.quantized_linear import QuantizedLinear
from leanlm.layers.quantized_tensor import QuantizedTensor
from leanlm.models import gemma3, llama
from leanlm.models.family import Family
from leanlm.plan import RuntimePlan, resolve_plan

FAMILIES: tuple[Family, ...] = (llama.FAMILY, gemma3.FAMILY)


def supported_names() -> str:
    return ", ".join(t for family in FAMILIES for t in family.model_types)


def family_for_model_type(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedArchitectureError(
        f"Model type '{model_type}' is not supported. leanlm runs: {supported_names()}. "
        "Use a model of one of these families, or add a family module under leanlm/models/ "
        "(docs/ARCHITECTURE.md, 'How to add a model family')."
    )


def family_for_gguf(arch: str | None) -> Family:
    for family in FAMILIES:
        if arch in family.gguf_architectures:
            return family
    known = ", ".join(a for family in FAMILIES for a in family.gguf_architectures)
    raise UnsupportedArchitectureError(
        f"GGUF architecture '{arch}' is not supported. leanlm runs: {known}. Use a model of one of these families."
    )


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """config.json -> ModelConfig, parsed by the family that owns its model_type (or architecture)."""
    model_type = raw.get("model_type")
    if model_type is None:
        archs = raw.get("architectures") or []
        owner = next((f for a in archs for f in FAMILIES if a in f.hf_architectures), None)
        if owner is None:
            family_for_model_type(archs[0] if archs else "unknown")  # raises, naming what is supported
        return owner.config_from_hf(raw)
    return family_for_model_type(model_type).config_from_hf(raw)


def config_from_gguf(meta: dict[str, Any]) -> ModelConfig:
    return family_for_gguf(meta.get("general.architecture")).config_from_gguf(meta)


def build_model(
    config: ModelConfig,
    weights: dict[str, torch.Tensor],
    plan: RuntimePlan | torch.dtype,
    device: torch.device | str = "cpu",
    kernels: str = "auto",
) -> nn.Module:
    """The family's module tree over `weights`, prepared to run as `plan` says. A dtype instead of a plan (tests,
    benchmarks) resolves one from dtype, device and kernels."""
    if isinstance(plan, torch.dtype):
        quantized = any(isinstance(t, QuantizedTensor) for t in weights.values())
        plan = resolve_plan(str(device), plan, kernels).for_weights(quantized)
        if not plan.half_weights:  # the dtype given is the one to compute in (16-bit weights: float32 around them)
            plan = dataclasses.replace(plan, compute_dtype=plan.dtype)
    family = family_for_model_type(config.model_type)
    with torch.device("meta"):  # no random init: parameters are assigned from the checkpoint
        model = family.model_class(config)
    # 16-bit weights load as they are (the plan's dtype); prepare_runtime puts the rest in the compute dtype
    dtype = plan.dtype if plan.half_weights else plan.compute_dtype
    model.load_weights({name: t.to(dtype) if isinstance(t, torch.Tensor) else t for name, t in weights.items()}, dtype)
    model = model.to(plan.device).eval()
    prepare_runtime(model, plan)
    return model


def prepare_runtime(model: nn.Module, plan: RuntimePlan) -> None:
    """Make `model` run as `plan` says: every quantized layer's kernel, the fused ops, the attention backend and
    the C++ stack (rebuilt here, the one place that changes kernel layouts). Call again after compress/ swaps
    layers or changes the plan."""
    model.plan = plan
    # 16-bit linears (and the embedding) keep their dtype below; "auto" rounds their activations to bfloat16
    use_half_kernels(model, plan.half_weights, plan.kernels == "auto")
    if plan.half_weights:
        _to_dtype_except(model, plan.compute_dtype, half_weight_ids(model))
    elif model.embed_tokens.weight.dtype != plan.compute_dtype:  # e.g. float32 activations after quantization
        model.to(plan.compute_dtype)  # quantized layers keep their integer codes; only floating tensors change
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.prepare_runtime(plan.compute_dtype, plan.device, plan.kernels)
    model.set_attention_backend(plan.attention)
    model.set_fused_ops(plan.fused_ops)


def _to_dtype_except(model: nn.Module, dtype: torch.dtype, keep: set[int]) -> None:
    """model.to(dtype) for floating tensors, but for the Parameters in `keep` (ids); in place, so sharing holds."""
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and param.is_floating_point() and id(param) not in keep and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                module._buffers[name] = buffer.to(dtype)

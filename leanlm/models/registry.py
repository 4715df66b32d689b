"""The families leanlm implements, looked up by HF model_type, HF architecture or GGUF architecture."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leanlm.config import ModelConfig
from leanlm.errors import UnsupportedArchitectureError
from leanlm.layers.quantized_linear import QuantizedLinear
from leanlm.models import gemma3, llama
from leanlm.models.family import Family

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
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    kernels: str = "auto",
) -> nn.Module:
    """kernels: how quantized layers run on CPU (layers.quantized_linear.KERNEL_MODES)."""
    family = family_for_model_type(config.model_type)
    with torch.device("meta"):  # no random init: parameters are assigned from the checkpoint
        model = family.model_class(config)
    model.load_weights({name: t.to(dtype) if isinstance(t, torch.Tensor) else t for name, t in weights.items()}, dtype)
    model = model.to(device).eval()
    model.kernel_mode = kernels  # layers quantized later (compress/) run the same way
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.prepare_runtime(dtype, torch.device(device), kernels)
    if dtype == torch.float32 and uses_leanlm_kernels(torch.device(device), kernels):
        model.set_fused_ops(True)
    return model


def uses_leanlm_kernels(device: torch.device, kernels: str) -> bool:
    """Whether quantized layers on `device` run leanlm's CPU kernels (which read float32 activations)."""
    if device.type != "cpu" or kernels == "torch":
        return False
    from leanlm.kernels.build import load_kernels

    return load_kernels()


def adopt_quantized_runtime(model: nn.Module) -> bool:
    """After layers were quantized in place (compress/): run the model as the saved artifact will load, with
    float32 activations around leanlm's kernels, so that saving and reloading changes no logit. The dense
    tensors' values are unchanged (bfloat16 -> float32 is exact). True when the model now computes in float32."""
    device = model.embed_tokens.weight.device
    if not uses_leanlm_kernels(device, getattr(model, "kernel_mode", "auto")):
        return False
    model.float()  # quantized layers keep their integer codes; only floating tensors change
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.prepare_runtime(torch.float32, device, model.kernel_mode)
    model.set_fused_ops(True)
    return True

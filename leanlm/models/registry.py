"""Architectures leanlm implements, keyed by HF model_type."""

from __future__ import annotations

import torch
from torch import nn

from leanlm.config import ModelConfig
from leanlm.errors import UnsupportedArchitectureError
from leanlm.layers.quantized_linear import QuantizedLinear
from leanlm.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,  # Qwen2 differs only by q/k/v bias, which the config carries
}


def build_model(
    config: ModelConfig,
    weights: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    kernels: str = "auto",
) -> nn.Module:
    """kernels: how quantized layers run on CPU (layers.quantized_linear.KERNEL_MODES)."""
    if config.model_type not in MODEL_CLASSES:
        raise UnsupportedArchitectureError(
            f"No implementation for model type '{config.model_type}'. Supported: {', '.join(MODEL_CLASSES)}."
        )
    with torch.device("meta"):  # no random init: parameters are assigned from the checkpoint
        model = MODEL_CLASSES[config.model_type](config)
    model.load_weights({name: t.to(dtype) if isinstance(t, torch.Tensor) else t for name, t in weights.items()}, dtype)
    model = model.to(device).eval()
    model.kernel_mode = kernels  # layers quantized later (compress/) run the same way
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.prepare_runtime(dtype, torch.device(device), kernels)
    if (
        dtype == torch.float32
        and uses_leanlm_kernels(torch.device(device), kernels)
        and hasattr(model, "set_fused_ops")
    ):
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
    if hasattr(model, "set_fused_ops"):
        model.set_fused_ops(True)
    return True

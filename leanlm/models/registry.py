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
    on_cpu = torch.device(device).type == "cpu"
    if kernels != "torch" and on_cpu and dtype == torch.float32 and hasattr(model, "set_fused_ops"):
        from leanlm.kernels.build import load_kernels

        model.set_fused_ops(load_kernels())
    return model

"""The in-memory model as its artifact will load, once compress/ has worked on float32 copies of the weights."""

from __future__ import annotations

import dataclasses

import torch

from leanlm.layers.quantized_linear import QuantizedLinear
from leanlm.models.registry import prepare_runtime


@torch.inference_mode()
def adopt_storage_dtype(llm, dtype: torch.dtype) -> None:
    """Dense tensors are saved in `dtype`. A quantized model keeps computing as its plan says (float32 activations
    around leanlm's kernels) over dense values rounded to `dtype`, exactly what reloading gives; a dense model
    computes in `dtype`. Speed and quality measured afterwards are the artifact's own."""
    quantized = any(isinstance(m, QuantizedLinear) for m in llm.model.modules())
    plan = dataclasses.replace(llm.plan, dtype=dtype).for_weights(quantized)
    # A quantized embedding (compress/quantize.py) reloads as its exact float32 values: no rounding for it.
    keep = {"embed_tokens.weight"} if hasattr(llm.model.embed_tokens, "quantized") else set()
    for name, param in llm.model.named_parameters():
        if param.is_floating_point() and name.split(".")[-1] == "weight" and name not in keep:
            param.data = param.data.to(dtype).to(plan.compute_dtype)
    llm.plan = plan
    prepare_runtime(llm.model, plan)

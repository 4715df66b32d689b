"""Swap a structurally pruned model into an LLM: a new config, a new module tree, and a new engine (the KV cache
shape follows the head count and the layer count). Everything else the LLM was set up with carries over: compute
dtype, device, kernel mode, attention backend, engine limits, KV-cache type and threads."""

from __future__ import annotations

import torch

from leanlm.config import ModelConfig


def install_model(llm, config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    from leanlm.models.registry import build_model

    old, engine = llm.model, llm.engine
    device = next(old.parameters()).device
    # Tensors made under inference_mode cannot become parameters; a clone outside it can.
    weights = {name: tensor.clone() for name, tensor in weights.items()}
    llm.model = build_model(config, weights, llm.compute_dtype, device, getattr(old, "kernel_mode", "auto"))
    if hasattr(old, "attention_name"):
        llm.model.set_attention_backend(old.attention_name)
    llm.config = config
    llm.engine = type(engine)(llm.model, llm.tokenizer, engine.config, engine.kv_cache_type, engine.threads)

"""Swap a structurally pruned model into an LLM: a new config, a new module tree, and a new engine (the KV cache
shape follows the head count and the layer count)."""

from __future__ import annotations

import torch

from leanlm.config import ModelConfig


def install_model(llm, config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    from leanlm.models.registry import build_model

    device = next(llm.model.parameters()).device
    # Tensors made under inference_mode cannot become parameters; a clone outside it can.
    weights = {name: tensor.clone() for name, tensor in weights.items()}
    llm.model = build_model(config, weights, llm.dtype, device)
    llm.config = config
    llm.engine = type(llm.engine)(llm.model, llm.tokenizer, llm.engine.config)  # same engine settings, new shapes

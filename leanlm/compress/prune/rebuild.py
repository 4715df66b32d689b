"""Swap a structurally pruned model into an LLM: a new config, a new module tree, and a new engine (the KV cache
shape follows the head count and the layer count). Everything else carries over: the LLM's runtime plan (device,
dtypes, kernel mode, attention backend, KV-cache type), the engine's limits and its threads."""

from __future__ import annotations

import torch

from leanlm.config import ModelConfig
from leanlm.layers.quantized_linear import QuantizedTensor
from leanlm.models.registry import build_model


def install_model(llm, config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    # Tensors made under inference_mode cannot become parameters; a clone outside it can.
    weights = {name: tensor.clone() for name, tensor in weights.items()}
    llm.plan = llm.plan.for_weights(any(isinstance(t, QuantizedTensor) for t in weights.values()))
    llm.model = build_model(config, weights, llm.plan)
    llm.config = config
    engine = llm.engine
    llm.engine = type(engine)(llm.model, llm.tokenizer, engine.config, llm.plan.kv_cache, engine.threads)

"""BERT (and MiniLM, which is BERT-shaped): config.json and HF tensor names -> leanlm's encoder.

Bare encoders (`BertModel`: sentence-transformers' embedders) and cross-encoders (`BertForSequenceClassification`:
pooler tanh(W h_cls + b), then the classifier) load from the same names, the latter under `bert.`.
"""

from __future__ import annotations

import torch

from leanlm.models.encoder import (
    EncoderConfig,
    embedding_weights,
    encoder_config_from_hf,
    fuse_layer_weights,
    tensor_getter,
    weight_prefix,
)

MODEL_TYPES = ("bert",)


def config_from_hf(raw: dict) -> EncoderConfig:
    return encoder_config_from_hf(raw, position_offset=0, head="bert")


def encoder_weights(config: EncoderConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> leanlm's (q/k/v fused); a bare encoder's pooler is dropped (embedders do not use it)."""
    get = tensor_getter(hf)
    prefix = weight_prefix(hf, ("bert.",))
    weights = embedding_weights(get, prefix)
    for layer in range(config.num_layers):
        weights.update(fuse_layer_weights(get, prefix, layer))
    if config.head == "bert":
        weights.update(
            {
                "head_dense.weight": get(f"{prefix}pooler.dense.weight"),
                "head_dense.bias": get(f"{prefix}pooler.dense.bias"),
                "head_out.weight": get("classifier.weight"),
                "head_out.bias": get("classifier.bias"),
            }
        )
    return weights

"""XLM-RoBERTa and RoBERTa: BERT's layer with positions counted from pad_token_id + 1 over real tokens only,
one token type, and a classification head of its own (dense + tanh + out_proj on <s>) for cross-encoders.
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

MODEL_TYPES = ("xlm-roberta", "roberta")


def config_from_hf(raw: dict) -> EncoderConfig:
    pad = int(raw.get("pad_token_id") or 1)
    return encoder_config_from_hf({**raw, "pad_token_id": pad}, position_offset=pad + 1, head="roberta")


def encoder_weights(config: EncoderConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    get = tensor_getter(hf)
    prefix = weight_prefix(hf, ("roberta.",))
    weights = embedding_weights(get, prefix)
    for layer in range(config.num_layers):
        weights.update(fuse_layer_weights(get, prefix, layer))
    if config.head == "roberta":
        weights.update(
            {
                "head_dense.weight": get("classifier.dense.weight"),
                "head_dense.bias": get("classifier.dense.bias"),
                "head_out.weight": get("classifier.out_proj.weight"),
                "head_out.bias": get("classifier.out_proj.bias"),
            }
        )
    return weights

"""The encoder families by HF model_type, and loading an encoder from an HF folder's config and tensors."""

from __future__ import annotations

import torch

from leanlm.errors import UnsupportedArchitectureError
from leanlm.models import bert, xlm_roberta
from leanlm.models.encoder import EncoderConfig, TextEncoder, build_encoder

ENCODER_FAMILIES = {model_type: family for family in (bert, xlm_roberta) for model_type in family.MODEL_TYPES}


def is_encoder_config(raw: dict) -> bool:
    return raw.get("model_type") in ENCODER_FAMILIES


def encoder_family(raw: dict):
    model_type = raw.get("model_type")
    if model_type not in ENCODER_FAMILIES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not an encoder leanlm runs. Supported encoders: "
            f"{', '.join(sorted(ENCODER_FAMILIES))}."
        )
    return ENCODER_FAMILIES[model_type]


def load_encoder(raw: dict, hf_weights: dict[str, torch.Tensor]) -> tuple[EncoderConfig, TextEncoder]:
    family = encoder_family(raw)
    config = family.config_from_hf(raw)
    return config, build_encoder(config, family.encoder_weights(config, hf_weights))

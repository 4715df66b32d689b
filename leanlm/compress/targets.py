"""Which linear layers a quantization method converts (shared by quantize.py and the calibrated driver)."""

from __future__ import annotations

from torch import nn

from leanlm.compress.config import QuantConfig
from leanlm.errors import InvalidRequestError


def target_linears(model: nn.Module, config: QuantConfig) -> dict[str, nn.Linear]:
    """The dense linear layers a method quantizes: every projection of every layer, and the LM head."""
    targets = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("layers.")}
    if config.include_lm_head and isinstance(model.lm_head, nn.Linear) and not head_ties_embedding(model, config):
        targets["lm_head"] = model.lm_head
    if not targets:
        raise InvalidRequestError("The model has no dense linear layers left to quantize (is it already quantized?).")
    return targets


def head_ties_embedding(model: nn.Module, config: QuantConfig) -> bool:
    """A tied LM head with a quantized embedding: the head runs on the embedding's own codes (int8 rows, as
    llama.cpp's tied Q8_0 token_embd), stored once, instead of being quantized by the method on its own."""
    return (
        config.include_lm_head
        and bool(config.embedding_bits)
        and isinstance(model.lm_head, nn.Linear)
        and model.lm_head.weight is model.embed_tokens.weight
    )

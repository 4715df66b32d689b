"""Whisper with int8 linear layers (W8A8: int8 weights per output row, int8 activations per token, int32 sums;
layers/int8_linear.py), as faster-whisper's compute_type="int8" does with CTranslate2.

Every Linear of the encoder and decoder layers is swapped: attention projections, cross-attention projections and
the MLPs. The convolution stem, LayerNorms, positions and the token embedding (which is also the output head) stay
float: the head sees one row per step and its rounding would move every logit. Per-token activation scales keep a
request's result independent of its batch, so batched == solo still holds.
"""

from __future__ import annotations

from torch import nn

from leanlm.layers.int8_linear import Int8DynamicLinear
from leanlm.models.whisper import WhisperModel


def quantize_int8(model: WhisperModel) -> WhisperModel:
    """Swap the model's layer Linears for Int8DynamicLinear, in place; returns the model."""
    for layer in [*model.encoder_layers, *model.decoder_layers]:
        for module in list(layer.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, Int8DynamicLinear.from_linear(child))
    return model

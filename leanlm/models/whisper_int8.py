"""Whisper with int8 linear layers (W8A8: int8 weights per output row, int8 activations per token, int32 sums;
layers/int8_linear.py), as faster-whisper's compute_type="int8" does with CTranslate2.

The Linears of the encoder and decoder layers are swapped: attention projections, cross-attention projections and
the MLPs' first layer. The MLPs' second layer (fc2) stays float: its input is a GELU output whose few large channels
take the per-token scale, and on the committed English clip quantizing it too cost two words at beam 5 (one
without it). The convolution stem, LayerNorms, positions and the token embedding (also the output head) stay
float. Per-token activation scales keep a request's result independent of its batch: batched == solo holds.
"""

from __future__ import annotations

from torch import nn

from leanlm.layers.int8_linear import Int8DynamicLinear
from leanlm.layers.onednn_linear import OneDNNLinear
from leanlm.models.whisper import WhisperModel

FLOAT_LINEARS = ("fc2",)  # kept in float32 (see above)


def quantize_int8(model: WhisperModel) -> WhisperModel:
    """Swap the model's layer Linears for Int8DynamicLinear, in place; returns the model."""
    for layer in [*model.encoder_layers, *model.decoder_layers]:
        for module in list(layer.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, (nn.Linear, OneDNNLinear)) and name not in FLOAT_LINEARS:
                    setattr(module, name, Int8DynamicLinear.from_linear(child))
    return model

"""The on-disk form of a leanlm quantized model, reading side (compress/artifact.py writes it).

A QuantizedLinear named X is stored as X.codes (codes of 4 bits or fewer packed two per byte), X.scale,
X.offset (absent when symmetric) and X.bias; quantization.json lists the layers with bits and group size (each its
own: mixed precision), and under "embedding" a token embedding stored the same way (dequantized on load).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from leanlm.errors import ModelFormatError
from leanlm.layers.quantized_tensor import QuantizedTensor

MANIFEST = "quantization.json"


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Two 4-bit (or smaller) codes per byte: element 2i in the low half, 2i+1 in the high half."""
    if bits > 4:
        return codes
    pairs = codes.view(codes.shape[0], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits > 4:
        return packed
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def read_quantized_weights(folder: Path, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | QuantizedTensor]:
    """Turn X.codes/X.scale/X.offset entries of a saved artifact back into QuantizedTensors named X.weight.
    No tensors at all is a config-only read (load_checkpoint(weights=False)): there is nothing to convert."""
    if not raw:
        return {}
    manifest = json.loads((folder / MANIFEST).read_text())
    weights = dict(raw)
    layers = dict(manifest.get("layers", {}))
    embedding = manifest.get("embedding")  # a quantized token embedding: the model dequantizes it into its table
    if embedding and "tied_to" not in embedding:
        layers["embed_tokens"] = embedding
    for name, layer in layers.items():
        try:
            codes = unpack_codes(weights.pop(f"{name}.codes"), layer["bits"])
            scale = weights.pop(f"{name}.scale")
        except KeyError as exc:
            raise ModelFormatError(f"{folder} lacks {exc} named in {MANIFEST}; the artifact is incomplete.") from exc
        offset = weights.pop(f"{name}.offset", None)
        group = layer["group_size"] if layer["group_size"] > 0 else codes.shape[1]
        weights[f"{name}.weight"] = QuantizedTensor(
            codes, scale.float(), None if offset is None else offset.float(), layer["bits"], group
        )
    if embedding and "tied_to" in embedding:  # stored once, as the head's codes
        weights["embed_tokens.weight"] = weights[f"{embedding['tied_to']}.weight"]
    return weights

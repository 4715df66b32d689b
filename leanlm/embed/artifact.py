"""A quantized encoder on disk (what `leanlm quantize` writes for an encoder) and loading it back.

The folder is the source model's folder (config.json, tokenizer, sentence-transformers modules: pooling, Dense,
Normalize) with its weight files replaced by model.safetensors in leanlm's names, the layers' linear layers in
their quantized form, and quantization.json ({"kind": "encoder", "precision": ..., "layers": ..., quality}):
  int8  X.codes (N, K) int8, X.scale (N,) per output row, X.inverse_smoothing (K,) when smoothed, X.bias
  int4  X.codes (4-bit, two per byte), X.scale and X.offset per group of 32 inputs, X.bias
Loading rebuilds the same modules, so the artifact embeds exactly as the in-memory model it was written from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from leanlm.embed.precision import use_short_attention
from leanlm.errors import ModelFormatError
from leanlm.formats.quantized_folder import MANIFEST, pack_codes, unpack_codes
from leanlm.layers.int8_linear import Int8DynamicLinear
from leanlm.layers.quantized_linear import QuantizedLinear
from leanlm.layers.quantized_tensor import QuantizedTensor
from leanlm.models.encoder import EncoderConfig, TextEncoder, build_encoder
from leanlm.models.encoders import encoder_family

ENCODER_KIND = "encoder"
# The source's weight files, which the artifact's model.safetensors replaces.
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.h5", "*.msgpack", "*.ot")
SKIPPED_FOLDERS = ("onnx", "openvino")


def is_encoder_artifact(path: Path) -> bool:
    manifest = Path(path) / MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()).get("kind") == ENCODER_KIND


def encoder_tensors(encoder: TextEncoder) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(tensors to save, quantized layers' descriptions) of an encoder whose linear layers `apply_precision` set."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, module in encoder.named_modules():
        if isinstance(module, Int8DynamicLinear):
            layers[name] = {"format": "int8-rows", "bits": 8, "smoothed": module.inverse_smoothing is not None}
            tensors[f"{name}.codes"] = module.codes_t.t()
            tensors[f"{name}.scale"] = module.weight_scale
            if module.inverse_smoothing is not None:
                tensors[f"{name}.inverse_smoothing"] = module.inverse_smoothing
        elif isinstance(module, QuantizedLinear):
            layers[name] = {"format": "groups", "bits": module.bits, "group_size": module.group_size}
            tensors[f"{name}.codes"] = pack_codes(module.codes, module.bits)
            tensors[f"{name}.scale"] = module.scale
            if module.offset is not None:
                tensors[f"{name}.offset"] = module.offset
        else:
            continue
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias
    quantized = tuple(f"{name}." for name in layers)
    for name, param in encoder.named_parameters():
        if not name.startswith(quantized):
            tensors[name] = param.float()
    return {name: t.detach().contiguous().cpu() for name, t in tensors.items()}, layers


def write_encoder_artifact(source: Path, encoder: TextEncoder, target: Path, manifest: dict) -> None:
    """Into the (empty, scratch) folder `target`: the source's files but its weights, the encoder's tensors, the
    manifest (with the layers added)."""
    from safetensors.torch import save_file

    source, target = Path(source), Path(target)
    skipped = {path for pattern in WEIGHT_FILES for path in source.glob(pattern)}
    for path in source.iterdir():
        if path in skipped or path.name in SKIPPED_FOLDERS or path.name.startswith(".") or path.name == MANIFEST:
            continue
        if path.is_dir():
            shutil.copytree(path, target / path.name)
        else:
            shutil.copy2(path, target / path.name)
    tensors, layers = encoder_tensors(encoder)
    save_file(tensors, target / "model.safetensors", metadata={"format": "leanlm-encoder"})
    (target / MANIFEST).write_text(json.dumps({**manifest, "kind": ENCODER_KIND, "layers": layers}, indent=2))


def read_encoder_artifact(path: Path, raw_config: dict) -> tuple[EncoderConfig, TextEncoder, str]:
    """(config, encoder, precision) of an artifact folder that `write_encoder_artifact` wrote."""
    from safetensors.torch import load_file

    manifest = json.loads((path / MANIFEST).read_text())
    config = encoder_family(raw_config).config_from_hf(raw_config)
    try:
        tensors = load_file(path / "model.safetensors")
    except (OSError, Exception) as exc:  # safetensors raises its own error type for a truncated file
        raise ModelFormatError(
            f"{path / 'model.safetensors'} is unreadable ({exc}); write the artifact again."
        ) from exc
    modules: dict[str, nn.Module] = {}
    try:
        for name, layer in manifest["layers"].items():
            modules[name] = _quantized_module(tensors, name, layer)
    except KeyError as exc:
        raise ModelFormatError(f"{path} lacks {exc} that {MANIFEST} names; the artifact is incomplete.") from exc
    encoder = build_encoder(config, tensors, modules)
    for layer in encoder.layers:  # as apply_precision sets it: int8 layers add the residual in their epilogue
        layer.adds_residual = all(isinstance(m, Int8DynamicLinear) for m in (layer.attn_out, layer.down))
    use_short_attention(encoder)
    return config, encoder, manifest["precision"]


def _quantized_module(tensors: dict[str, torch.Tensor], name: str, layer: dict) -> nn.Module:
    bias = tensors.pop(f"{name}.bias", None)
    codes, scale = tensors.pop(f"{name}.codes"), tensors.pop(f"{name}.scale")
    if layer["format"] == "int8-rows":
        smoothing = tensors.pop(f"{name}.inverse_smoothing", None)
        return Int8DynamicLinear.from_codes(codes, scale, bias, smoothing)
    offset = tensors.pop(f"{name}.offset", None)
    weight = QuantizedTensor(
        unpack_codes(codes, layer["bits"]), scale.float(), offset, layer["bits"], layer["group_size"]
    )
    module = QuantizedLinear(weight, None if bias is None else bias.float())
    module.prepare_runtime(torch.float32, torch.device("cpu"), mode="auto")  # as apply_precision("int4") runs it
    return module

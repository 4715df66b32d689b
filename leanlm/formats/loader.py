"""Read a model reference (GGUF file, HF folder, or nothing = the default model): raw config, tensors, tokenizer.

What the names and values mean is the family's business: models/checkpoint.py turns what this module reads into
a Checkpoint (ModelConfig + HF-named weights) through the family module that owns the architecture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from leanlm.config import ModelConfig
from leanlm.errors import ModelFormatError, ModelNotFoundError
from leanlm.formats.tokenizer import Tokenizer
from leanlm.layers.quantized_tensor import QuantizedTensor


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # HF tensor names
    tokenizer: Tokenizer
    path: Path
    weight_types: dict[str, str] = field(default_factory=dict)  # storage type per tensor (GGUF: Q4_1, F32, ...)


def resolve_model_path(model: str | Path | None) -> Path:
    if model is None or str(model) == "default":
        from leanlm.formats.assets import default_model_path

        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        from leanlm.formats.assets import KNOWN_MODELS, fetch_known_model

        if str(model) in KNOWN_MODELS:  # a path on disk wins over a known name
            return fetch_known_model(str(model))
        raise ModelNotFoundError(
            f"Model not found: {path}. Pass a .gguf file or a Hugging Face folder (config.json + *.safetensors), "
            f"a known model name ({', '.join(KNOWN_MODELS)}; see `leanlm models`), "
            "or leave --model out to use the default model."
        )
    return path


def locate_checkpoint(model: str | Path | None) -> tuple[str, Path]:
    """("gguf", file) or ("hf", folder) for a model reference."""
    path = resolve_model_path(model)
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise ModelNotFoundError(
            f"{path} has no config.json and {len(ggufs)} .gguf files. Pass a Hugging Face folder or one .gguf file."
        )
    return "gguf", path


def read_gguf_tensor(gguf_file, name: str, dtype: torch.dtype, native_quant: bool) -> tuple[object, str]:
    """One tensor and its storage type name. native_quant keeps matrices in gguf_blocks.NATIVE_TYPES as
    QuantizedTensors (bit-exact) instead of dequantizing."""
    from leanlm.formats.gguf_blocks import NATIVE_TYPES, blocks_to_quantized

    type_name = gguf_file.tensor_type_name(name)
    shape = gguf_file.tensors[name].shape
    if native_quant and type_name in NATIVE_TYPES and len(shape) == 2:
        return blocks_to_quantized(gguf_file.raw_tensor(name), type_name, shape), type_name
    return gguf_file.load_tensor(name, dtype), type_name


@dataclass
class HFFolder:
    raw_config: dict
    weights: dict[str, torch.Tensor]  # HF names
    tokenizer: Tokenizer
    weight_types: dict[str, str]


def read_hf_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path / 'config.json'} is not valid JSON ({exc}). Restore the file.") from exc


def read_hf_folder(path: Path, dtype: torch.dtype, with_weights: bool = True) -> HFFolder:
    raw_config = read_hf_config(path)
    raw = _read_hf_weights(path) if with_weights else {}
    if (path / "quantization.json").is_file():  # a leanlm quantized artifact
        from leanlm.formats.quantized_folder import read_quantized_weights

        raw = read_quantized_weights(path, raw)
    if raw and (path / "compression.json").is_file():  # a leanlm pruned artifact: sparse matrices stored compactly
        from leanlm.formats.sparse_folder import read_sparse_weights

        raw = read_sparse_weights(path, raw)
    weights = {
        name: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for name, t in raw.items()
    }
    types = {name: _type_name(t) for name, t in weights.items()}
    return HFFolder(raw_config, weights, Tokenizer.from_folder(path), types)


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """A folder's tensors under their stored names (safetensors, sharded or not, else pytorch_model*.bin)."""
    return _read_hf_weights(path)


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / name for name in shard_names]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelNotFoundError(f"{path} lacks the shard {absent[0]} named in {index.name}. Download it again.")
    if files:
        weights: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                weights.update(load_file(file))
            except (SafetensorError, OSError) as exc:
                raise ModelFormatError(f"{file} is corrupt or truncated ({exc}). Download it again.") from exc
        return weights
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        weights = {}
        for file in bins:
            # weights_only: never unpickle arbitrary objects from a checkpoint
            try:
                weights.update(torch.load(file, map_location="cpu", weights_only=True))
            except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
                reason = str(exc).split(". ")[0].splitlines()[0] if str(exc) else type(exc).__name__
                raise ModelFormatError(
                    f"{file} is corrupt, truncated or not a plain weights file ({reason}). Download it again."
                ) from exc
        return weights
    raise ModelNotFoundError(f"{path} has a config.json but no *.safetensors or pytorch_model*.bin weights.")


def _type_name(tensor: torch.Tensor | QuantizedTensor) -> str:
    if isinstance(tensor, QuantizedTensor):
        return f"int{tensor.bits}g{tensor.group_size}"
    return str(tensor.dtype).removeprefix("torch.")

"""Turn a model reference (GGUF file, HF folder, or nothing = the default model) into config + weights + tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from leanlm.config import ModelConfig
from leanlm.errors import ModelFormatError, ModelNotFoundError
from leanlm.formats.tokenizer import Tokenizer
from leanlm.layers.quantized_linear import QuantizedTensor


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
        raise ModelNotFoundError(
            f"Model not found: {path}. Pass a .gguf file or a Hugging Face folder (config.json + *.safetensors), "
            "or leave --model out to use the default model."
        )
    return path


def load_checkpoint(
    model: str | Path | None, dtype: torch.dtype = torch.float32, weights: bool = True, native_quant: bool = False
) -> Checkpoint:
    """weights=False reads only config and tokenizer (the weights dict stays empty).
    native_quant=True keeps GGUF Q8_0/Q4_0/Q4_1 matrices as QuantizedTensors (bit-exact) instead of dequantizing."""
    path = resolve_model_path(model)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _load_hf_folder(path, dtype, weights)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], dtype, weights, native_quant)
        raise ModelNotFoundError(
            f"{path} has no config.json and {len(ggufs)} .gguf files. Pass a Hugging Face folder or one .gguf file."
        )
    return _load_gguf(path, dtype, weights, native_quant)


def _load_gguf(path: Path, dtype: torch.dtype, with_weights: bool = True, native_quant: bool = False) -> Checkpoint:
    from leanlm.formats.gguf import GGUFFile
    from leanlm.formats.gguf_blocks import NATIVE_TYPES, blocks_to_quantized
    from leanlm.models.llama import hf_name_from_gguf, unpermute_gguf_rope

    gguf_file = GGUFFile(path)
    config = ModelConfig.from_gguf_metadata(gguf_file.metadata)
    # llama.cpp permutes q/k rows of "llama" models for its interleaved rope; qwen2 files keep HF's layout.
    permuted = gguf_file.metadata.get("general.architecture") in ("llama", "mistral")
    weights, types = {}, {}
    for name in gguf_file.tensors:
        hf_name = hf_name_from_gguf(name)
        if hf_name is None or not with_weights:
            continue
        type_name = gguf_file.tensor_type_name(name)
        shape = gguf_file.tensors[name].shape
        if native_quant and type_name in NATIVE_TYPES and len(shape) == 2:
            tensor = blocks_to_quantized(gguf_file.raw_tensor(name), type_name, shape)
        else:
            tensor = gguf_file.load_tensor(name, dtype)
        if permuted and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = config.num_heads if ".q_proj." in hf_name else config.num_kv_heads
            unpermute = partial(unpermute_gguf_rope, num_heads=heads)
            tensor = tensor.map_rows(unpermute) if isinstance(tensor, QuantizedTensor) else unpermute(tensor)
        weights[hf_name] = tensor
        types[hf_name] = type_name
    tokenizer = Tokenizer.from_gguf_metadata(gguf_file.metadata)
    if "output.weight" not in gguf_file.tensors:
        config = config.replace(tie_word_embeddings=True)
    return Checkpoint(config, weights, tokenizer, path, types)


def _load_hf_folder(path: Path, dtype: torch.dtype, with_weights: bool = True) -> Checkpoint:
    try:
        raw_config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path / 'config.json'} is not valid JSON ({exc}). Restore the file.") from exc
    config = ModelConfig.from_hf_dict(raw_config)
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
    return Checkpoint(
        config,
        weights,
        Tokenizer.from_folder(path),
        path,
        {name: _type_name(t) for name, t in weights.items()},
    )


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

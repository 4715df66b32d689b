"""Model reference -> Checkpoint(config, HF-named weights, tokenizer), read by formats/ and interpreted by the
family module that owns the architecture (its config keys, tensor names and stored values)."""

from __future__ import annotations

from pathlib import Path

import torch

from leanlm.formats.gguf import GGUFFile
from leanlm.formats.gguf_blocks import NATIVE_TYPES
from leanlm.formats.loader import Checkpoint, locate_checkpoint, read_gguf_tensor, read_hf_config, read_hf_folder
from leanlm.formats.tokenizer import Tokenizer
from leanlm.models.registry import config_from_hf, family_for_gguf, family_for_model_type


def load_checkpoint(
    model: str | Path | None, dtype: torch.dtype = torch.float32, weights: bool = True, native_quant: bool = False
) -> Checkpoint:
    """weights=False reads only config and tokenizer (the weights dict stays empty).
    native_quant=True keeps GGUF matrices in the block types of gguf_blocks.NATIVE_TYPES (Q8_0, Q4_0/1, Q5_0/1,
    Q4_K, Q5_K, Q6_K) as QuantizedTensors (bit-exact) instead of dequantizing, when every decoder projection is
    stored in one of them (a file with other types, such as Q2_K or Q3_K, is dequantized whole)."""
    kind, path = locate_checkpoint(model)
    if kind == "hf":
        config = config_from_hf(read_hf_config(path))  # an unknown architecture is named before weights are read
        folder = read_hf_folder(path, dtype, weights)
        tokenizer = folder.tokenizer
        if tokenizer.chat_template is None:
            tokenizer.chat_template = family_for_model_type(config.model_type).chat_template
        return Checkpoint(config, folder.weights, tokenizer, path, folder.weight_types)
    return _load_gguf(path, dtype, weights, native_quant)


def holds_quantized_weights(model: str | Path | None) -> bool:
    """Whether the checkpoint loads as quantized layers: a leanlm quantized folder, or a GGUF whose decoder
    projections are all in block types leanlm's kernels run (a dense/quantized mix would run at dense speed)."""
    kind, path = locate_checkpoint(model)
    if kind == "hf":
        return (path / "quantization.json").is_file()
    return _native_projections(GGUFFile(path))


def _native_projections(gguf_file: GGUFFile) -> bool:
    family = family_for_gguf(gguf_file.metadata.get("general.architecture"))
    projections = [n for n in gguf_file.tensors if (family.hf_name_from_gguf(n) or "").endswith("proj.weight")]
    return all(gguf_file.tensor_type_name(n) in NATIVE_TYPES for n in projections)


def _load_gguf(path: Path, dtype: torch.dtype, with_weights: bool, native_quant: bool) -> Checkpoint:
    gguf_file = GGUFFile(path)
    arch = gguf_file.metadata.get("general.architecture")
    family = family_for_gguf(arch)
    config = family.config_from_gguf(gguf_file.metadata)
    if "output.weight" not in gguf_file.tensors:
        config = config.replace(tie_word_embeddings=True)
    native_quant = native_quant and _native_projections(gguf_file)
    weights, types = {}, {}
    for name in gguf_file.tensors:
        hf_name = family.hf_name_from_gguf(name)
        if hf_name is None or not with_weights:
            continue
        tensor, types[hf_name] = read_gguf_tensor(gguf_file, name, dtype, native_quant)
        weights[hf_name] = family.tensor_from_gguf(hf_name, tensor, config, arch)
    tokenizer = Tokenizer.from_gguf_metadata(gguf_file.metadata)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = family.chat_template
    return Checkpoint(config, weights, tokenizer, path, types)

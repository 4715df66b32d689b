"""A quantized model on disk: config.json, tokenizer files, model.safetensors and quantization.json.

A QuantizedLinear named X is stored as X.codes (4-bit codes packed two per byte), X.scale, X.offset,
X.bias. Loading needs neither calibration data nor the original model. The folder is written under a
temporary name and renamed at the end, so an interrupted run never leaves a folder that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from leanlm.errors import ModelFormatError
from leanlm.layers.quantized_linear import QuantizedLinear, QuantizedTensor

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


def hf_config_dict(config) -> dict:
    """config.json in Hugging Face's vocabulary, so the folder also reads as an ordinary model description."""
    raw = dict(config.extra)
    raw.update(
        {
            "model_type": config.model_type,
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "max_position_embeddings": config.context_length,
            "rms_norm_eps": config.rms_norm_eps,
            "rope_theta": config.rope_theta,
            "rope_scaling": config.rope_scaling,
            "tie_word_embeddings": False,  # the artifact stores the LM head separately
            "attention_bias": config.attention_bias,
            "mlp_bias": config.mlp_bias,
        }
    )
    raw.pop("rope_parameters", None)
    return raw


def save_quantized(llm, folder: str | Path, manifest: dict) -> Path:
    """Write the (quantized) model of `llm` to `folder`, atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    scratch.chmod(0o755)  # mkdtemp makes it private; the artifact is an ordinary shareable folder
    try:
        tensors, layers = {}, {}
        for name, module in llm.model.named_modules():
            if isinstance(module, QuantizedLinear):
                layers[name] = {
                    "bits": module.bits,
                    "group_size": module.group_size,
                    "symmetric": module.offset is None,
                }
                tensors[f"{name}.codes"] = pack_codes(module.codes, module.bits)
                tensors[f"{name}.scale"] = module.scale
                if module.offset is not None:
                    tensors[f"{name}.offset"] = module.offset
                if module.bias is not None:
                    tensors[f"{name}.bias"] = module.bias.detach()
        quantized_prefixes = tuple(f"{name}." for name in layers)
        for name, tensor in llm.model.state_dict().items():
            if not name.startswith(quantized_prefixes) and name not in tensors:
                tensors[name] = tensor
        tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        if (
            "lm_head.weight" in tensors
            and tensors["lm_head.weight"].data_ptr() == tensors["embed_tokens.weight"].data_ptr()
        ):
            tensors["lm_head.weight"] = tensors["lm_head.weight"].clone()  # safetensors refuses shared storage
        save_file(tensors, scratch / "model.safetensors", metadata={"format": "leanlm"})
        (scratch / "config.json").write_text(json.dumps(hf_config_dict(llm.config), indent=2))
        llm.tokenizer.to_folder_files(scratch)
        (scratch / MANIFEST).write_text(json.dumps({**manifest, "layers": layers}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(scratch, folder)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return folder


def read_quantized_weights(folder: Path, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | QuantizedTensor]:
    """Turn X.codes/X.scale/X.offset entries of a saved artifact back into QuantizedTensors named X.weight."""
    manifest = json.loads((folder / MANIFEST).read_text())
    weights = dict(raw)
    for name, layer in manifest.get("layers", {}).items():
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
    return weights

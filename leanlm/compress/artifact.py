"""Write a quantized model: config.json, tokenizer files, model.safetensors and quantization.json.

The layout is formats/quantized_folder.py's; loading needs neither calibration data nor the original
model. The folder is written under a temporary name and renamed at the end, so an interrupted run never
leaves a folder that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from leanlm.formats.quantized_folder import MANIFEST, pack_codes
from leanlm.kernels.layout import fits_float16
from leanlm.layers.quantized_linear import QuantizedLinear


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


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a scratch folder next to `folder`; on success it replaces `folder` in one rename, on any error it is
    removed, so an interrupted run never leaves a folder that loads."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    scratch.chmod(0o755)  # mkdtemp makes it private; the artifact is an ordinary shareable folder
    try:
        yield scratch
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(scratch, folder)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def save_quantized(llm, folder: str | Path, manifest: dict) -> Path:
    """Write the (quantized) model of `llm` to `folder`, atomically."""
    with atomic_folder(folder) as scratch:
        write_quantized(llm, scratch, manifest)
    return Path(folder)


def as_float16_if_exact(params: torch.Tensor) -> torch.Tensor:
    """Group scales/offsets in float16 (half the bytes; compress/quantize.py rounds them so) unless that would
    change a value (parameters from elsewhere), then as they are. The reader widens them to float32."""
    return params.half() if fits_float16(params) else params


def quantized_embedding(model):
    """The embedding's codes when compress/quantize.py rounded it and the table still holds exactly their values
    (and, tied, the head still runs on them)."""
    weight = getattr(model.embed_tokens, "quantized", None)
    table = model.embed_tokens.weight
    if weight is None or not torch.equal(weight.dequantize(table.dtype).to(table.device), table):
        return None
    if getattr(model.embed_tokens, "ties_head", False):
        head = model.lm_head
        if not isinstance(head, QuantizedLinear) or not torch.equal(head.dequantize(table.dtype), table.cpu()):
            return None
    return weight


def write_quantized(llm, scratch: Path, manifest: dict) -> None:
    """The files of a quantized artifact, written into the (scratch) folder `scratch`."""
    from safetensors.torch import save_file

    tensors, layers = {}, {}
    for name, module in llm.model.named_modules():
        if isinstance(module, QuantizedLinear):
            layers[name] = {
                "bits": module.bits,
                "group_size": module.group_size,
                "symmetric": module.offset is None,
            }
            tensors[f"{name}.codes"] = pack_codes(module.codes, module.bits)
            tensors[f"{name}.scale"] = as_float16_if_exact(module.scale)
            if module.offset is not None:
                tensors[f"{name}.offset"] = as_float16_if_exact(module.offset)
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach()
    embedding = quantized_embedding(llm.model)
    if embedding is not None:
        described = {"bits": embedding.bits, "group_size": embedding.group_size, "symmetric": embedding.offset is None}
        if getattr(llm.model.embed_tokens, "ties_head", False):
            described["tied_to"] = "lm_head"  # the head's codes, stored once
        else:
            tensors["embed_tokens.codes"] = pack_codes(embedding.codes, embedding.bits)
            tensors["embed_tokens.scale"] = as_float16_if_exact(embedding.scale)
            if embedding.offset is not None:
                tensors["embed_tokens.offset"] = as_float16_if_exact(embedding.offset)
        manifest = {**manifest, "embedding": described}
    quantized_prefixes = tuple(f"{name}." for name in layers) + (("embed_tokens.",) if embedding is not None else ())
    for name, tensor in llm.model.state_dict().items():
        if not name.startswith(quantized_prefixes) and name not in tensors:
            tensors[name] = tensor
    # Dense tensors at the model's stated dtype: a bfloat16 model computing in float32 around leanlm's
    # kernels (compress/storage.py) holds bfloat16 values, so this loses nothing.
    stated = getattr(llm, "dtype", None)
    tensors = {
        name: (
            t.to(stated)
            if stated is not None
            and t.is_floating_point()
            and name.split(".")[-1] == "weight"
            and not name.startswith(quantized_prefixes)
            else t
        )
        .detach()
        .contiguous()
        .cpu()
        for name, t in tensors.items()
    }
    if (
        "lm_head.weight" in tensors
        and tensors["lm_head.weight"].data_ptr() == tensors["embed_tokens.weight"].data_ptr()
    ):
        tensors["lm_head.weight"] = tensors["lm_head.weight"].clone()  # safetensors refuses shared storage
    save_file(tensors, scratch / "model.safetensors", metadata={"format": "leanlm"})
    (scratch / "config.json").write_text(json.dumps(hf_config_dict(llm.config), indent=2))
    llm.tokenizer.to_folder_files(scratch)
    (scratch / MANIFEST).write_text(json.dumps({**manifest, "layers": layers}, indent=2))

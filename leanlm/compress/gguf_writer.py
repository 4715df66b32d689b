"""Write a leanlm model (quantized or not) as a GGUF file that llama.cpp runs.

Quantized layers map onto GGUF blocks of 32 without re-quantizing: int8 -> Q8_0 (the row or group scale
repeated per block) and any code width <= 4 bits with an offset -> Q4_1 (scale and offset repeated per
block). Only the scale and offset round to float16, as GGUF stores them. Dense matrices are written as
F16, vectors as F32; a token embedding quantized to int8 rows (compress/quantize.py) as Q8_0, exactly.
With `kquants` (a Q4_K_M-style file, the types llama.cpp users pick), layers whose rows are multiples of 256 are
re-rounded onto K-quant grids (compress/kquant_encode.py): 4 bits or fewer -> Q4_K, more (int8, mixed precision's
raised layers) and a quantized embedding -> Q6_K. Metadata (tokenizer, chat template, hyperparameters) comes from
the source GGUF.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from leanlm.errors import InvalidRequestError
from leanlm.layers.quantized_linear import QuantizedLinear, QuantizedTensor

BLOCK = 32


def to_q8_0(q: QuantizedTensor) -> np.ndarray:
    rows, cols = q.codes.shape
    if q.bits != 8 or q.offset is not None or q.group_size % BLOCK:
        raise InvalidRequestError("Q8_0 holds symmetric int8 with groups that are multiples of 32.")
    d = q.per_column(q.scale, BLOCK).to(torch.float16)  # (rows, cols/32)
    codes = q.codes.view(rows, cols // BLOCK, BLOCK)
    blocks = torch.cat([d.unsqueeze(-1).view(torch.uint8), codes.view(torch.uint8)], dim=-1)
    return blocks.reshape(rows, -1).numpy()


def to_q4_1(q: QuantizedTensor) -> np.ndarray:
    rows, cols = q.codes.shape
    if q.bits > 4 or q.group_size % BLOCK:
        raise InvalidRequestError("Q4_1 holds codes of 4 bits or fewer with groups that are multiples of 32.")
    d = q.per_column(q.scale, BLOCK).to(torch.float16)
    offset = q.offset if q.offset is not None else torch.zeros_like(q.scale)
    m = q.per_column(offset, BLOCK).to(torch.float16)
    codes = q.codes.to(torch.uint8).view(rows, cols // BLOCK, BLOCK)
    nibbles = codes[..., :16] | (codes[..., 16:] << 4)  # element j low, element j + 16 high
    blocks = torch.cat([d.unsqueeze(-1).view(torch.uint8), m.unsqueeze(-1).view(torch.uint8), nibbles], dim=-1)
    return blocks.reshape(rows, -1).numpy()


def gguf_blocks(tensor: QuantizedTensor, kquants: bool) -> tuple[np.ndarray, str]:
    """(block bytes, GGML type name) for one quantized matrix."""
    from leanlm.compress.kquant_encode import SUPER, encode_q4_k, encode_q6_k

    if kquants and tensor.codes.shape[1] % SUPER == 0:
        if tensor.bits <= 4:
            return encode_q4_k(tensor.dequantize()), "Q4_K"
        return encode_q6_k(tensor.dequantize()), "Q6_K"
    if tensor.bits == 8:
        return to_q8_0(tensor), "Q8_0"
    return to_q4_1(tensor), "Q4_1"


def write_gguf(llm, source_gguf: str | Path, target: str | Path, kquants: bool = False) -> Path:
    """Write llm.model as GGUF, with the source GGUF's metadata. Atomic (temporary name, then rename).
    Tensor names and stored values come from the model's family (models/<family>.py), as the loader reads them.
    `kquants`: Q4_K/Q6_K where the rows allow (a Q4_K_M-style mix), else the exact Q4_1/Q8_0 mapping."""
    import gguf

    from leanlm.models.registry import family_for_model_type

    source, target = Path(source_gguf), Path(target)
    if source.suffix != ".gguf" or not source.is_file():
        raise InvalidRequestError(
            f"GGUF export copies the tokenizer and metadata of the original GGUF, and {source} is not one. "
            "Quantize a model loaded from a .gguf file to export it."
        )
    reader = gguf.GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    partial = target.with_name(target.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch=arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    cfg = llm.config
    family = family_for_model_type(cfg.model_type)
    for hf_name, tensor in _hf_tensors(llm.model):
        name = family.gguf_name_from_hf(hf_name)
        if name is None:
            continue
        tensor = family.tensor_to_gguf(hf_name, tensor, cfg, arch)
        if isinstance(tensor, QuantizedTensor):
            blocks, type_name = gguf_blocks(tensor, kquants)
            writer.add_tensor(name, blocks, raw_dtype=getattr(gguf.GGMLQuantizationType, type_name))
            continue
        array = tensor.detach().float().cpu().numpy()
        writer.add_tensor(
            name, array.astype(np.float16 if array.ndim == 2 and not name.endswith(".bias") else np.float32)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, target)
    return target


def exact_embedding(module) -> QuantizedTensor | None:
    """The embedding's int8 codes when the table still holds exactly their values (compress/quantize.py)."""
    weight = getattr(module, "quantized", None)
    if weight is None or weight.bits != 8 or weight.offset is not None:
        return None
    return (
        weight if torch.equal(weight.dequantize(module.weight.dtype).to(module.weight.device), module.weight) else None
    )


def _hf_tensors(model):
    """(HF name, tensor or QuantizedTensor) of every weight and bias, with fused q/k/v and gate/up split again."""
    cfg = model.config
    splits = {
        "self_attn.qkv_proj": (("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)),
        "mlp.gate_up_proj": (("gate", cfg.intermediate_size), ("up", cfg.intermediate_size)),
    }
    tied = not isinstance(model.lm_head, QuantizedLinear) and model.lm_head.weight is model.embed_tokens.weight
    # a head on the int8 embedding's own codes (compress/quantize.py): llama.cpp ties a file without output.weight
    tied = tied or (getattr(model.embed_tokens, "ties_head", False) and exact_embedding(model.embed_tokens) is not None)
    for module_name, module in model.named_modules():
        if module_name == "lm_head" and tied:
            continue
        weight = module.weight_q if isinstance(module, QuantizedLinear) else getattr(module, "weight", None)
        if module_name == "embed_tokens" and exact_embedding(module) is not None:
            weight = module.quantized  # int8 rows in groups of 32: Q8_0 as it is
        if not isinstance(weight, QuantizedTensor | torch.Tensor) or module_name.endswith("rotary"):
            continue
        bias = getattr(module, "bias", None)
        prefix = module_name if module_name == "lm_head" else f"model.{module_name}"
        block, _, leaf = module_name.partition("layers.")[2].partition(".")
        parts = splits.get(leaf)
        if parts is None:
            yield f"{prefix}.weight", weight
            if isinstance(bias, torch.Tensor):
                yield f"{prefix}.bias", bias
            continue
        start, stem = 0, prefix.rsplit(".", 1)[0]
        for part, rows in parts:
            rows_of = slice(start, start + rows)
            piece = (
                weight.map_rows(lambda t, r=rows_of: t[r]) if isinstance(weight, QuantizedTensor) else weight[rows_of]
            )
            yield f"{stem}.{part}_proj.weight", piece
            if isinstance(bias, torch.Tensor):
                yield f"{stem}.{part}_proj.bias", bias[rows_of]
            start += rows

"""Write a leanlm model (quantized or not) as a GGUF file that llama.cpp runs.

Quantized layers map onto GGUF blocks of 32 without re-quantizing: int8 -> Q8_0 (the row or group scale
repeated per block) and any code width <= 4 bits with an offset -> Q4_1 (scale and offset repeated per
block). Only the scale and offset round to float16, as GGUF stores them. Dense matrices are written as
F16, vectors as F32. Metadata (tokenizer, chat template, hyperparameters) comes from the source GGUF.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from leanlm.errors import InvalidRequestError
from leanlm.layers.quantized_linear import QuantizedLinear, QuantizedTensor

BLOCK = 32
# HF-style module name (after leanlm's fusion) -> GGUF tensor names of its row blocks, in order.
_SPLITS = {"self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v"), "mlp.gate_up_proj": ("ffn_gate", "ffn_up")}
_SINGLE = {
    "self_attn.o_proj": "attn_output",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


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


def write_gguf(llm, source_gguf: str | Path, target: str | Path) -> Path:
    """Write llm.model as GGUF, with the source GGUF's metadata. Atomic (temporary name, then rename)."""
    import gguf

    from leanlm.models.llama import permute_gguf_rope as permute

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
    permuted = arch in ("llama", "mistral")

    def add(name: str, module_or_tensor, row_slice: slice | None = None, heads: int | None = None) -> None:
        if isinstance(module_or_tensor, QuantizedLinear):
            q = module_or_tensor.weight_q
            if row_slice is not None:
                q = q.map_rows(lambda t: t[row_slice])
            if permuted and heads:
                q = q.map_rows(lambda t: permute(t, heads))
            if q.bits == 8:
                writer.add_tensor(name, to_q8_0(q), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(name, to_q4_1(q), raw_dtype=gguf.GGMLQuantizationType.Q4_1)
            return
        tensor = module_or_tensor.weight if hasattr(module_or_tensor, "weight") else module_or_tensor
        tensor = tensor.detach().float().cpu()
        if row_slice is not None:
            tensor = tensor[row_slice]
        if permuted and heads:
            tensor = permute(tensor, heads)
        writer.add_tensor(name, tensor.numpy().astype(np.float16 if tensor.dim() == 2 else np.float32))

    model = llm.model
    add("token_embd.weight", model.embed_tokens)
    add("output_norm.weight", model.norm)
    if isinstance(model.lm_head, QuantizedLinear) or model.lm_head.weight is not model.embed_tokens.weight:
        add("output.weight", model.lm_head)
    sizes = {
        "attn_q": (cfg.q_size, cfg.num_heads),
        "attn_k": (cfg.kv_size, cfg.num_kv_heads),
        "attn_v": (cfg.kv_size, None),
        "ffn_gate": (cfg.intermediate_size, None),
        "ffn_up": (cfg.intermediate_size, None),
    }
    for index, layer in enumerate(model.layers):
        for path, parts in _SPLITS.items():
            module, start = layer.get_submodule(path), 0
            for part in parts:
                rows, heads = sizes[part]
                add(f"blk.{index}.{part}.weight", module, slice(start, start + rows), heads)
                if module.bias is not None:
                    writer.add_tensor(
                        f"blk.{index}.{part}.bias", module.bias.detach().float()[start : start + rows].numpy()
                    )
                start += rows
        for path, short in _SINGLE.items():
            add(f"blk.{index}.{short}.weight", layer.get_submodule(path))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, target)
    return target

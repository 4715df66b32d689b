"""Keep a quantized model quantized through layer and structured pruning.

Pruning runs on float32 copies of the weights. Afterwards every projection (and the LM head) goes back to blocks:
a matrix the pruning left untouched (a kept layer's projection that no repair refitted) keeps the source's own
blocks, bit for bit; any other (new shapes, refitted weights) is quantized by round-to-nearest at 4 bits in
groups of 32 with an offset, the layout of GGUF's Q4_1 that leanlm's kernels run fastest.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlm.compress.config import QuantConfig
from leanlm.compress.rtn import quantize_rtn
from leanlm.compress.targets import target_linears
from leanlm.layers.quantized_linear import QuantizedLinear, QuantizedTensor

# embedding_bits=0: the LM head stays a target, so a tied head keeps the source's own blocks too
REQUANTIZE = QuantConfig("int4", bits=4, group_size=32, embedding_bits=0)


def native_blocks(model: nn.Module) -> dict[str, QuantizedTensor]:
    """{module name: QuantizedTensor} of a natively loaded quantized model's linear layers."""
    return {name: m.weight_q for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def requantize_pruned(
    model: nn.Module, native: dict[str, QuantizedTensor], dropped_layers: list[int], num_source_layers: int
) -> tuple[dict[str, QuantizedTensor], dict]:
    """Blocks for every target linear of the pruned float `model` (see the module docstring), and a report of
    which were kept and which re-quantized. Layer i of `model` is the source's i-th layer not in `dropped_layers`."""
    kept = [i for i in range(num_source_layers) if i not in set(dropped_layers)]
    blocks, reused, requantized = {}, [], []
    for name, linear in target_linears(model, REQUANTIZE).items():
        weight = linear.weight.detach().float().cpu()
        source = native.get(_source_name(name, kept))
        same_shape = source is not None and tuple(source.codes.shape) == tuple(weight.shape)
        if same_shape and torch.equal(source.dequantize(), weight):
            blocks[name] = source
            reused.append(name)
        else:
            blocks[name] = quantize_rtn(weight, REQUANTIZE.bits, REQUANTIZE.group_size, symmetric=False)
            requantized.append(name)
    report = {"kept_source_blocks": len(reused), "requantized": requantized, "requantized_to": "int4 g32 (rtn)"}
    return blocks, report


def _source_name(name: str, kept: list[int]) -> str:
    if not name.startswith("layers."):
        return name
    _, index, rest = name.split(".", 2)
    return f"layers.{kept[int(index)]}.{rest}"

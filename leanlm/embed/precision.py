"""How an encoder's linear layers run: float32 (the reference), bf16, int8 (W8A8, dynamic per-token scales) or
int4 (leanlm's q4 kernel, groups of 32 with an offset). Embeddings, LayerNorms, attention and pooling stay as
they are (float32, or bf16 for the bf16 precision)."""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

import torch
from torch import nn

from leanlm.errors import InvalidRequestError

PRECISIONS = ("float32", "bf16", "int8", "int4")


@cache
def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: oneDNN's bf16 matmul is then several times float32's; elsewhere it is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InvalidRequestError(f"Unknown precision {precision!r}. Choose among: {', '.join(PRECISIONS)}.")
    return precision


def apply_precision(encoder: nn.Module, precision: str) -> nn.Module:
    """Swap the encoder layers' nn.Linear modules (not the classifier head) for `precision`'s; returns the encoder."""
    check_precision(precision)
    if precision == "float32":
        return encoder
    if precision == "bf16":
        if not cpu_has_fast_bf16():
            warnings.warn(
                "This CPU has neither AVX-512 BF16 nor AMX: bf16 matmuls are emulated and slower than float32. "
                "Use --precision int8 or float32 here.",
                stacklevel=2,
            )
        for layer in encoder.layers:
            layer.to(torch.bfloat16)
        return encoder
    for layer in encoder.layers:
        for name, child in list(layer.named_children()):
            if isinstance(child, nn.Linear):
                setattr(layer, name, _quantized(child, precision))
    return encoder


def _quantized(linear: nn.Linear, precision: str) -> nn.Module:
    if precision == "int8":
        from leanlm.layers.int8_linear import Int8DynamicLinear

        return Int8DynamicLinear.from_linear(linear)
    from leanlm.compress.rtn import quantize_rtn
    from leanlm.layers.quantized_linear import QuantizedLinear

    layer = QuantizedLinear(quantize_rtn(linear.weight, 4, 32, symmetric=False), linear.bias)
    layer.prepare_runtime(torch.float32, torch.device("cpu"), mode="auto")
    return layer

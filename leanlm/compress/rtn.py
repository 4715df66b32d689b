"""Round-to-nearest quantization: the baseline every calibrated method (GPTQ, AWQ) must beat."""

from __future__ import annotations

import torch

from leanlm.errors import InvalidRequestError
from leanlm.layers.quantized_linear import QuantizedTensor


def check_group_size(in_features: int, group_size: int) -> int:
    """group_size <= 0 means one group per row (per-channel)."""
    group = in_features if group_size <= 0 else group_size
    if in_features % group:
        raise InvalidRequestError(
            f"group size {group_size} does not divide the input width {in_features}; pick a divisor (32, 64, 128)."
        )
    return group


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedTensor:
    """Symmetric: codes in [-(2^(b-1)-1), 2^(b-1)-1] (int8), W = codes * scale.
    Asymmetric: codes in [0, 2^b - 1] (uint8), W = codes * scale + offset with offset = the group minimum."""
    rows, cols = weight.shape
    group = check_group_size(cols, group_size)
    w = weight.detach().float().reshape(rows, cols // group, group)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (w.abs().amax(-1) / qmax).clamp(min=1e-10)
        codes = torch.round(w / scale.unsqueeze(-1)).clamp(-qmax, qmax).to(torch.int8)
        return QuantizedTensor(codes.reshape(rows, cols), scale, None, bits, group)
    qmax = 2**bits - 1
    low, high = w.amin(-1), w.amax(-1)
    scale = ((high - low) / qmax).clamp(min=1e-10)
    codes = torch.round((w - low.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, qmax).to(torch.uint8)
    return QuantizedTensor(codes.reshape(rows, cols), scale, low, bits, group)

"""Round-to-nearest quantization: the baseline every calibrated method (GPTQ, AWQ) must beat."""

from __future__ import annotations

import torch

from leanlm.errors import InvalidRequestError
from leanlm.layers.quantized_tensor import QuantizedTensor, expand_groups


def check_group_size(in_features: int, group_size: int) -> int:
    """group_size <= 0 (or >= the width) means one group per row (per channel). Otherwise a multiple of 8;
    when it does not divide the width, the last group of each row is shorter."""
    if group_size <= 0 or group_size >= in_features:
        return in_features
    if group_size % 8:
        raise InvalidRequestError(f"group size {group_size} is not a multiple of 8; use 32, 64 or 128.")
    return group_size


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedTensor:
    """Symmetric: codes in [-(2^(b-1)-1), 2^(b-1)-1] (int8), W = codes * scale.
    Asymmetric: codes in [0, 2^b - 1] (uint8), W = codes * scale + offset with offset = the group minimum."""
    rows, cols = weight.shape
    group = check_group_size(cols, group_size)
    w = weight.detach().float()
    groups = [w[:, start : start + group] for start in range(0, cols, group)]  # the last may be shorter
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = torch.stack([(g.abs().amax(-1) / qmax).clamp(min=1e-10) for g in groups], dim=1)
        codes = torch.round(w / expand_groups(scale, group, cols)).clamp(-qmax, qmax).to(torch.int8)
        return QuantizedTensor(codes, scale, None, bits, group)
    qmax = 2**bits - 1
    low = torch.stack([g.amin(-1) for g in groups], dim=1)
    high = torch.stack([g.amax(-1) for g in groups], dim=1)
    scale = ((high - low) / qmax).clamp(min=1e-10)
    codes = torch.round((w - expand_groups(low, group, cols)) / expand_groups(scale, group, cols))
    codes = codes.clamp(0, qmax).to(torch.uint8)
    return QuantizedTensor(codes, scale, low, bits, group)

"""AWQ (Lin et al., 2023): scale up the input channels that carry large activations before rounding, so their weights
lose less precision, and divide the previous operation's output by the same factors so the float function is unchanged.

`search_scales` picks s = mean|x|^alpha on a grid of alpha in [0, 1] by the output error of round-to-nearest on W * s;
alpha = 0 (s = 1) is plain round-to-nearest, so the search never does worse than it on the calibration inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanlm.compress.rtn import quantize_rtn

GRID = 20  # alpha = 0, 1/20, ..., 1
MIN_MEAN = 1e-5  # floor for silent channels, so s stays finite after normalisation
SEARCH_BUDGET = 4_000_000  # input rows * output features per error evaluation
MIN_SEARCH_ROWS = 256
MAX_SEARCH_OUTPUTS = 4096  # output rows round independently: a strided subset estimates the error of a wide lm_head


@dataclass(frozen=True)
class ScaleSearch:
    scales: torch.Tensor  # (K,) multiply W's columns, divide the input channels
    alpha: float
    error: float  # mean squared output error with the chosen scales
    rtn_error: float  # the same with s = 1 (plain round-to-nearest)


def strided_rows(x: torch.Tensor, limit: int) -> torch.Tensor:
    """At most `limit` rows of x, evenly spread."""
    if x.shape[0] <= limit:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, limit).long()]


def output_error(x: torch.Tensor, gram: torch.Tensor | None, weight: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean squared difference of x W^T and x Ŵ^T; with gram = x^T x / n it is mean_j d_j^T gram d_j (d = W - Ŵ),
    cheaper when there are more rows than input channels."""
    diff = weight - approx
    if gram is None:
        return (x @ diff.T).pow(2).mean().item()
    return ((diff @ gram) * diff).sum().item() / diff.shape[0]


def search_scales(
    x: torch.Tensor,
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    tie=None,
    grid: int = GRID,
) -> ScaleSearch:
    """x (n, K) calibration inputs, weight (N, K). `tie` maps the per-channel means to ones that must share a scale
    (e.g. attention heads that read one key/value head)."""
    weight = strided_rows(weight.float(), MAX_SEARCH_OUTPUTS)
    x = strided_rows(x.reshape(-1, x.shape[-1]).float(), max(MIN_SEARCH_ROWS, SEARCH_BUDGET // weight.shape[0]))
    gram = x.T @ x / x.shape[0] if x.shape[0] > x.shape[1] else None
    mean = x.abs().mean(0).clamp(min=MIN_MEAN)
    if tie is not None:
        mean = tie(mean)
    best: tuple[float, float, torch.Tensor] | None = None
    rtn_error = float("nan")
    for step in range(grid + 1):
        alpha = step / grid
        scales = mean.pow(alpha)
        scales = scales / (scales.max() * scales.min()).sqrt()  # centre around 1: keeps W * s in a sane range
        approx = quantize_rtn(weight * scales, bits, group_size, symmetric).dequantize() / scales
        error = output_error(x, gram, weight, approx)
        if step == 0:
            rtn_error = error
        if best is None or error < best[0]:
            best = (error, alpha, scales)
    return ScaleSearch(scales=best[2], alpha=best[1], error=best[0], rtn_error=rtn_error)


def tie_heads(num_heads: int, num_kv_heads: int):
    """o_proj's inputs come in q-head blocks; a scale folded into v rows is shared by the q heads of one kv head.
    Returns (tie, to_v): tie averages the means per kv head and repeats them; to_v picks one copy per kv head."""
    group = num_heads // num_kv_heads

    def tie(mean: torch.Tensor) -> torch.Tensor:
        per_kv = mean.view(num_kv_heads, group, -1).mean(1)  # (H_kv, D); q head h reads kv head h // group
        return per_kv.repeat_interleave(group, dim=0).flatten()

    def to_v(scales: torch.Tensor) -> torch.Tensor:
        return scales.view(num_kv_heads, group, -1)[:, 0].flatten()

    return tie, to_v

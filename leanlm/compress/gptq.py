"""GPTQ (Frantar et al., 2022): quantize one linear column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss ||X W^T - X Ŵ^T||^2.

The Hessian H = 2 X^T X / n comes from the calibration inputs of that linear (`accumulate_hessian`);
`gptq_quantize` turns (W, H) into a QuantizedTensor with the same layout as round-to-nearest (rtn.py).

act_order quantizes columns in order of decreasing diag(H) (the most sensitive first, while the most columns are left
to absorb their error). Groups stay contiguous in the original column order, so the stored layout is unchanged: a
group's scale and offset are fixed the first time one of its columns comes up, from the weights as updated so far.
"""

from __future__ import annotations

import torch

from leanlm.compress.rtn import check_group_size
from leanlm.errors import CalibrationError
from leanlm.kernels.threads import scoped_threads
from leanlm.layers.quantized_linear import QuantizedTensor

BLOCK_SIZE = 128  # columns updated eagerly; the rest of the matrix gets one batched update per block


def accumulate_hessian(hessian: torch.Tensor | None, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Add a batch of inputs x (..., K) to a running H = 2 X^T X / n (float64); returns (H, n)."""
    x = x.reshape(-1, x.shape[-1]).float()
    if hessian is None:
        hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    total = count + x.shape[0]
    # float32 matmul per batch (fast), float64 running sum (no drift over many batches).
    hessian.mul_(count / total).add_((x.T @ x).double(), alpha=2.0 / total)
    return hessian, total


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and offset of one group (N, g), as rtn.py computes them."""
    if symmetric:
        return (w.abs().amax(-1) / (2 ** (bits - 1) - 1)).clamp(min=1e-10), None
    low, high = w.amin(-1), w.amax(-1)
    return ((high - low) / (2**bits - 1)).clamp(min=1e-10), low


def quantize_column(
    w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of one column (N,) on its group's grid."""
    if offset is None:
        qmax = 2 ** (bits - 1) - 1
        codes = torch.round(w / scale).clamp(-qmax, qmax)
        return codes, codes * scale
    codes = torch.round((w - offset) / scale).clamp(0, 2**bits - 1)
    return codes, codes * scale + offset


def check_finite_hessian(hessian: torch.Tensor, name: str, method: str = "GPTQ") -> None:
    """A NaN or infinity in the inputs poisons all of H; say so here rather than fail later inside Cholesky."""
    bad = (~torch.isfinite(hessian)).sum().item()
    if bad:
        raise CalibrationError(
            f"{method}: the Hessian of {name} has {bad} non-finite entries of {hessian.numel()}: its calibration "
            "inputs hold NaN or infinity. Likely cause: the model's weights (uninitialized or corrupt tensors, or an "
            "overflow in float16/bfloat16). Check that the model gives finite logits, or load it with --dtype float32."
        )


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1: row i holds the error-feedback weights of column i. float32, as in the paper;
    damping keeps it well conditioned."""
    h = hessian.float().clone()
    diag = torch.arange(h.shape[0])
    mean = h.diagonal().mean().clamp(min=1e-8)
    h[diag, diag] += damp * mean
    for attempt in range(5):
        chol, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            break
        # Nearly singular (few calibration tokens): add more damping rather than fail the conversion.
        h[diag, diag] += (10.0**attempt) * 0.01 * mean
    else:
        chol = torch.linalg.cholesky(h)  # raises with torch's own message
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = BLOCK_SIZE,
    name: str = "the linear layer",
) -> QuantizedTensor:
    """weight (N, K), hessian (K, K) -> QuantizedTensor whose dequantized weight minimises the output error.
    `name` is the layer's name in error messages."""
    rows, cols = weight.shape
    group = check_group_size(cols, group_size)
    check_finite_hessian(hessian, name)
    w = weight.detach().float().cpu().clone()
    h = hessian.double().cpu().clone()
    dead = h.diagonal() == 0
    # A column that never sees input cannot affect the output: make H invertible there and quantize it as zero.
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    # Transposed (K, N): each column is a contiguous row, which the column loop reads and updates.
    wt = w[:, order].T.contiguous()
    codes = torch.zeros(cols, rows)  # (K, N) in processing order
    num_groups = -(-cols // group)  # the last group may be shorter
    scale = torch.zeros(num_groups, rows)
    offset = None if symmetric else torch.zeros(num_groups, rows)
    with single_thread():
        u = inverse_hessian_factor(h[order][:, order], damp)
        _quantize_columns(wt, u, codes, scale, offset, order, group, bits, block_size)

    restored = torch.empty_like(codes)
    restored[order] = codes
    code_dtype = torch.int8 if symmetric else torch.uint8
    offset = None if offset is None else offset.T.contiguous()
    return QuantizedTensor(restored.T.contiguous().to(code_dtype), scale.T.contiguous(), offset, bits, group)


def _quantize_columns(
    wt: torch.Tensor,
    u: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    order: torch.Tensor,
    group: int,
    bits: int,
    block_size: int,
) -> None:
    """The GPTQ loop over wt (K, N) in processing order; fills codes (K, N), scale and offset (G, N) in place."""
    cols, rows = wt.shape
    original_group = (order // group).tolist()
    ready: set[int] = set()
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = wt[start:end]  # a view: updates land in wt
        errors = torch.zeros(end - start, rows)
        for i in range(end - start):
            column = start + i
            g = original_group[column]
            if g not in ready:
                # First column of this group to come up: the group's weights, as updated so far, set its grid.
                members = (order[column:] // group == g).nonzero().squeeze(1) + column
                params = group_params(wt[members].T, bits, offset is None)
                scale[g] = params[0]
                if offset is not None:
                    offset[g] = params[1]
                ready.add(g)
            codes[column], quantized = quantize_column(block[i], scale[g], None if offset is None else offset[g], bits)
            error = (block[i] - quantized) / u[column, column]
            block[i:].sub_(u[column, column:end].unsqueeze(1) * error.unsqueeze(0))
            errors[i] = error
        wt[end:] -= u[start:end, end:].T @ errors


def single_thread():
    """The column loop is thousands of small ops, and the factorisations are small too: handing them to a thread pool
    costs more than it saves (10x more on a busy 2-core machine, measured), so they run on one thread. Scoped to
    this thread and this block (kernels/threads.py): other threads keep their count."""
    return scoped_threads(1)

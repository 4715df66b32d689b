"""SparseGPT (Frantar & Alistarh, 2023): prune one linear column by column and push each pruned weight's loss onto
the columns not yet visited, weighted by the inverse Hessian of ||X W^T - X Ŵ^T||^2 (the OBS update GPTQ uses
for rounding; the Hessian and its Cholesky factor come from gptq.py).

The mask is chosen as the sweep goes, from w^2 / [H^-1]_jj^2 (the OBS loss of removing w): for unstructured
sparsity once per block of columns (per row or over the whole block, by `scope`), for N:M at the start of
every group of M columns, from the weights as updated so far.
"""

from __future__ import annotations

import torch

from leanlm.compress.gptq import check_finite_hessian, inverse_hessian_factor, single_thread
from leanlm.compress.prune.masks import check_nm_width, layer_mask, nm_mask, row_mask

BLOCK_SIZE = 128  # columns updated eagerly; the rest of the matrix gets one batched update per block


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    scope: str = "layer",
    damp: float = 0.01,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """weight (N, K), hessian (K, K) -> pruned weight (N, K) float32 with the output error minimised."""
    check_finite_hessian(hessian, f"a ({weight.shape[0]} x {weight.shape[1]}) linear layer", "SparseGPT")
    cols = weight.shape[1]
    if nm is not None:
        check_nm_width(cols, nm[1])
        block_size = max(nm[1], block_size // nm[1] * nm[1])  # an N:M group never straddles two blocks
    h = hessian.double().cpu().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # a column that never sees input costs nothing to prune; make H invertible there
    # Transposed (K, N): each column is a contiguous row, which the column loop reads and updates.
    wt = weight.detach().float().cpu().T.contiguous()
    with single_thread():  # thousands of small ops: a thread pool costs more than it gives (see gptq.py)
        u = inverse_hessian_factor(h, damp)
        for start in range(0, cols, block_size):
            end = min(start + block_size, cols)
            _prune_block(wt, u, start, end, sparsity, nm, scope)
    return wt.T.contiguous()


def _prune_block(
    wt: torch.Tensor,
    u: torch.Tensor,
    start: int,
    end: int,
    sparsity: float,
    nm: tuple[int, int] | None,
    scope: str,
) -> None:
    block = wt[start:end]  # (B, N), a view: updates land in wt
    diag = u.diagonal()[start:end].unsqueeze(1)  # (B, 1)
    keep = None
    if nm is None:
        scores = (block.pow(2) / diag.pow(2)).T  # (N, B): the OBS loss of pruning each weight
        keep = (row_mask(scores, sparsity) if scope == "row" else layer_mask(scores, sparsity)).T  # (B, N)
    else:
        keep = torch.ones_like(block, dtype=torch.bool)
    errors = torch.zeros_like(block)
    for i in range(end - start):
        column = start + i
        if nm is not None and i % nm[1] == 0:
            group = slice(i, i + nm[1])
            scores = (block[group].pow(2) / diag[group].pow(2)).T  # (N, M)
            keep[group] = nm_mask(scores, *nm).T
        pruned = block[i] * keep[i]
        error = (block[i] - pruned) / u[column, column]
        block[i:].sub_(u[column, column:end].unsqueeze(1) * error.unsqueeze(0))
        block[i] = pruned  # exact zeros, not the update's rounding residue
        errors[i] = error
    wt[end:] -= u[start:end, end:].T @ errors

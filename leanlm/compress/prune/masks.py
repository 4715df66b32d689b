"""Keep-masks from importance scores: per row, per matrix, one global threshold, or an N:M pattern.

Every mask keeps an exact count (top-k, ties broken by position), never `score > threshold` alone: weights
dequantized from a GGUF take few distinct values, and a plain threshold would miss the requested sparsity there.
"""

from __future__ import annotations

import torch

from leanlm.errors import InvalidRequestError


def keep_count(size: int, sparsity: float) -> int:
    """How many of `size` weights survive `sparsity` (rounded to the nearest count)."""
    return size - round(size * sparsity)


def top_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the `keep` largest scores along the last dimension."""
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    if keep > 0:
        mask.scatter_(-1, scores.topk(keep, dim=-1).indices, True)
    return mask


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(N, K) scores -> (N, K) mask keeping the same number of weights in every output row."""
    return top_mask(scores, keep_count(scores.shape[-1], sparsity))


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(N, K) scores -> (N, K) mask keeping the largest scores of the whole matrix."""
    return top_mask(scores.reshape(-1), keep_count(scores.numel(), sparsity)).view(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(N, K) scores -> (N, K) mask keeping the n largest of every m consecutive inputs of each row."""
    rows, cols = scores.shape
    check_nm_width(cols, m)
    return top_mask(scores.reshape(rows, cols // m, m), n).view(rows, cols)


def check_nm_width(cols: int, m: int) -> None:
    if cols % m:
        raise InvalidRequestError(f"A matrix with {cols} inputs does not split into groups of {m}; use a smaller M.")


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all matrices: the `sparsity` fraction of smallest scores overall is pruned, so layers end
    up with different sparsities. Scores equal to the threshold are kept in order until the count is exact."""
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    pruned = round(flat.numel() * sparsity)
    if pruned == 0:
        return {name: torch.ones(s.shape, dtype=torch.bool) for name, s in scores.items()}
    threshold = flat.kthvalue(pruned).values
    del flat
    # Everything below the threshold goes; of the ties at it, just enough go to make the count exact.
    ties_to_prune = pruned - sum(int((s < threshold).sum()) for s in scores.values())
    masks = {}
    for name, score in scores.items():
        mask = score > threshold
        ties = (score == threshold).reshape(-1).nonzero().squeeze(1)
        if ties_to_prune > 0:
            drop = ties[:ties_to_prune]
            ties_to_prune -= drop.numel()
            ties = ties[drop.numel() :]
        mask.view(-1)[ties] = True
        masks[name] = mask
    return masks


def measured_sparsity(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()

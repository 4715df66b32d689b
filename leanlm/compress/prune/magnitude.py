"""Magnitude pruning: the smallest |W| go. The baseline Wanda and SparseGPT must beat; needs no data."""

from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) importance of each weight: its absolute value."""
    return weight.detach().float().abs()

"""Wanda (Sun et al., 2023): a weight's importance is |W_ij| times the L2 norm of input feature j over the
calibration tokens, so a small weight on a large activation survives. No weight update, one pass per layer."""

from __future__ import annotations

import torch


def input_norms(inputs: torch.Tensor) -> torch.Tensor:
    """(n, K) calibration inputs of a linear -> (K,) L2 norm of each input feature."""
    return inputs.reshape(-1, inputs.shape[-1]).float().pow(2).sum(0).sqrt()


def wanda_scores(weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """(N, K) importance |W| * ||X_j||."""
    return weight.detach().float().abs() * input_norms(inputs).unsqueeze(0)

"""Weight repair without training: refit a projection by least squares so the pruned model's output at that point
matches the original model's on calibration data.

    W' = argmin ||X W'^T - Y||^2 + lambda ||W' - W||^2   =>   W'^T = (X^T X + lambda I)^-1 (X^T Y + lambda W^T)

X holds the inputs the pruned projection sees, Y the outputs the original layer produced; the ridge term pulls
towards the current weights, so directions the calibration text never excites keep their values.
"""

from __future__ import annotations

import torch


def refit(weight: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, damp: float) -> torch.Tensor:
    """weight (N, K), inputs (n, K), targets (n, N) -> refitted weight (N, K) float32."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    y = targets.reshape(-1, targets.shape[-1]).double()
    gram = x.T @ x / x.shape[0]  # (K, K)
    ridge = damp * gram.diagonal().mean().clamp(min=1e-12)
    gram.diagonal().add_(ridge)
    rhs = x.T @ y / x.shape[0] + ridge * weight.double().T  # (K, N)
    return torch.linalg.solve(gram, rhs).T.float().contiguous()

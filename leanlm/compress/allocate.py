"""Bits per layer under a size budget: a multiple-choice knapsack over the measured sensitivities.

Each group (a decoder layer, or one tensor) takes one of its bit widths; its cost is the bytes it takes on disk and
its loss the KL measured with it alone quantized at that width (compress/sensitivity.py). Losses are assumed to
add up, as in HAWQ-style allocation. The dynamic programme is exact over sizes rounded up to `unit` bytes, so the
budget always holds, and more budget never gives a larger total loss.
"""

from __future__ import annotations

import math

import numpy as np

from leanlm.errors import InvalidRequestError

PARAM_BYTES = 2  # scale and offset are stored as float16 (compress/artifact.py)


def stored_bytes(rows: int, cols: int, bits: int, group_size: int, symmetric: bool) -> int:
    """Bytes of one quantized matrix in the artifact: codes of 4 bits or fewer two per byte, wider codes one per
    byte, and a float16 scale (and offset unless symmetric) per group of each row."""
    group = cols if group_size <= 0 or group_size >= cols else group_size
    code_bytes = rows * cols // 2 if bits <= 4 else rows * cols
    return code_bytes + rows * math.ceil(cols / group) * PARAM_BYTES * (1 + (not symmetric))


def allocate_bits(
    kl: dict[str, dict[int, float]], size: dict[str, dict[int, int]], budget: int, unit: int | None = None
) -> dict[str, int]:
    """{group: bits} minimising the summed KL with the summed size at most `budget` bytes. `kl[g][b]` and
    `size[g][b]` for the same widths b; `unit`: the size resolution (default: 1/10000 of the smallest total)."""
    if set(kl) != set(size) or any(set(kl[g]) != set(size[g]) or not kl[g] for g in kl):
        raise InvalidRequestError("allocate_bits needs the same groups and widths in kl and size.")
    groups = sorted(kl)
    options = {g: sorted(size[g], key=lambda b: (size[g][b], -b)) for g in groups}  # cheapest first
    floor = sum(size[g][options[g][0]] for g in groups)
    if budget < floor:
        raise InvalidRequestError(
            f"The size budget ({budget} bytes) is below the smallest allocation ({floor} bytes): raise the budget."
        )
    unit = unit or max(1, floor // 10_000)
    capacity = (budget - floor) // unit
    best = np.zeros(capacity + 1)  # best[c]: the least total KL with extra cost at most c units
    picks = []
    for g in groups:
        cheapest = size[g][options[g][0]]
        costs = [math.ceil((size[g][b] - cheapest) / unit) for b in options[g]]
        candidates = np.full((len(costs), capacity + 1), np.inf)
        for i, (b, cost) in enumerate(zip(options[g], costs, strict=True)):
            if cost <= capacity:
                candidates[i, cost:] = best[: capacity + 1 - cost] + kl[g][b]
        pick = candidates.argmin(0)  # ties: the cheaper option (listed first)
        best = candidates[pick, np.arange(capacity + 1)]
        picks.append((costs, pick))
    allocation, c = {}, capacity
    for g, (costs, pick) in zip(reversed(groups), reversed(picks), strict=True):
        i = int(pick[c])
        allocation[g] = options[g][i]
        c -= costs[i]
    return allocation

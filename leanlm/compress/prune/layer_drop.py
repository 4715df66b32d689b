"""Which whole decoder layers to remove: the ones whose removal the calibration text notices least.

Two measured scores:
- cosine: how much a layer changes its input, 1 - mean cos(x_in, x_out) over tokens (ShortGPT's block influence);
  one pass of the model, the layers with the smallest change go.
- kl: KL(original || model without the layer) on the next-token distributions, chosen greedily: remove the
  cheapest layer, then score the rest again without it, `count` times. Costs about count x layers / 2 model passes,
  so it scores on at most KL_SEQUENCES x KL_LENGTH calibration tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import sys

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.errors import InvalidRequestError

KL_SEQUENCES = 2
KL_LENGTH = 128


def float_copy(module: nn.Module) -> nn.Module:
    """The module itself when it already runs in float32 on CPU, else a float32 CPU copy."""
    first = next(module.parameters())
    return (
        module if first.dtype == torch.float32 and first.device.type == "cpu" else copy.deepcopy(module).float().cpu()
    )


def check_drop_count(count: int, num_layers: int) -> None:
    if not 0 < count < num_layers:
        raise InvalidRequestError(
            f"Cannot drop {count} of the model's {num_layers} layers: keep at least one. Pass --drop between 1 and "
            f"{num_layers - 1}."
        )


@torch.inference_mode()
def choose_layers(model: nn.Module, hidden: torch.Tensor, ctx, count: int, score: str) -> tuple[list[int], list[float]]:
    """hidden (S, T, hidden): embedded calibration tokens. Returns (sorted layer indices to drop, the score of each
    layer when it was chosen or last measured)."""
    layers = [float_copy(layer) for layer in model.layers]
    check_drop_count(count, len(layers))
    if score == "cosine":
        scores = cosine_scores(layers, hidden, ctx)
        return sorted(sorted(range(len(layers)), key=scores.__getitem__)[:count]), scores
    head = (float_copy(model.norm), float_copy(model.lm_head))
    return greedy_kl(layers, head, hidden[:KL_SEQUENCES, :KL_LENGTH], _truncate(ctx, KL_SEQUENCES, KL_LENGTH), count)


def cosine_scores(layers: list[nn.Module], hidden: torch.Tensor, ctx) -> list[float]:
    scores = []
    for layer in layers:
        out = layer(hidden, ctx)
        scores.append(1 - F.cosine_similarity(hidden, out, dim=-1).mean().item())
        hidden = out
    return scores


def greedy_kl(layers, head, hidden: torch.Tensor, ctx, count: int) -> tuple[list[int], list[float]]:
    reference = _log_probs(head, _run(layers, hidden, ctx, set(), 0))
    dropped: set[int] = set()
    scores = [float("nan")] * len(layers)
    for step in range(count):
        inputs = _layer_inputs(layers, hidden, ctx, dropped)  # inputs[i]: what layer i sees with `dropped` gone
        for index in (i for i in range(len(layers)) if i not in dropped):
            out = _run(layers, inputs[index], ctx, dropped | {index}, index)
            scores[index] = _kl(reference, _log_probs(head, out))
        best = min((i for i in range(len(layers)) if i not in dropped), key=scores.__getitem__)
        dropped.add(best)
        print(f"drop {step + 1}/{count}: layer {best} (KL {scores[best]:.4f})", file=sys.stderr, flush=True)
    return sorted(dropped), scores


def _run(layers, hidden: torch.Tensor, ctx, skipped: set[int], start: int) -> torch.Tensor:
    for index in range(start, len(layers)):
        if index not in skipped:
            hidden = layers[index](hidden, ctx)
    return hidden


def _layer_inputs(layers, hidden: torch.Tensor, ctx, skipped: set[int]) -> list[torch.Tensor]:
    inputs = []
    for index, layer in enumerate(layers):
        inputs.append(hidden)
        if index not in skipped:
            hidden = layer(hidden, ctx)
    return inputs


def _log_probs(head, hidden: torch.Tensor) -> torch.Tensor:
    norm, lm_head = head
    return lm_head(norm(hidden)).float().log_softmax(-1).reshape(-1, lm_head.out_features)  # (S*T, V)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean().item()


def _truncate(ctx, sequences: int, length: int):
    """The context for the first `sequences` rows and `length` positions of the calibration batch."""
    return dataclasses.replace(ctx, cos=ctx.cos[:sequences, :, :length], sin=ctx.sin[:sequences, :, :length])

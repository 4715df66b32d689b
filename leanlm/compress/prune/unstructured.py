"""Unstructured and N:M pruning of every decoder projection (the embedding and LM head stay dense), in place.

Magnitude needs no data. Wanda and SparseGPT run calibration text through the model one decoder layer at a time
(compress/calibrated.py's driver): each linear is pruned from the inputs it sees with the linears before it,
in this layer and the earlier ones, already pruned.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlm.compress.calibrated import calibration_inputs, calibration_tensor, capture_input, run_layers, write_back
from leanlm.compress.gptq import accumulate_hessian
from leanlm.compress.prune.config import PruneConfig
from leanlm.compress.prune.magnitude import magnitude_scores
from leanlm.compress.prune.masks import check_nm_width, global_masks, layer_mask, measured_sparsity, nm_mask, row_mask
from leanlm.compress.prune.sparsegpt import sparsegpt_prune
from leanlm.compress.prune.wanda import wanda_scores
from leanlm.errors import InvalidRequestError


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every dense projection of every decoder layer, in execution order (qkv, o, gate_up, down)."""
    targets = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("layers.")}
    if not targets:
        raise InvalidRequestError(
            "The model has no dense decoder projections to prune (is it quantized?). Prune first, then quantize."
        )
    return targets


def select_mask(scores: torch.Tensor, config: PruneConfig) -> torch.Tensor:
    """(N, K) importance -> (N, K) keep-mask by the config's pattern or scope."""
    if config.nm is not None:
        return nm_mask(scores, *config.nm)
    return row_mask(scores, config.sparsity) if config.scope == "row" else layer_mask(scores, config.sparsity)


@torch.inference_mode()
def prune_unstructured(llm, config: PruneConfig, calibration_ids: list[list[int]] | None = None) -> dict:
    """Zero weights of `llm.model` in place. Returns {"sparsity": {linear name: fraction of zeros}}."""
    model = llm.model
    targets = prunable_linears(model)
    if config.nm is not None:
        for name, linear in targets.items():
            try:
                check_nm_width(linear.in_features, config.nm[1])
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"{name}: {exc}") from None
    if config.method == "magnitude":
        _prune_by_magnitude(targets, config)
    else:
        hidden, ctx = calibration_inputs(model, calibration_tensor(llm, config, calibration_ids))

        def convert(index: int, work: nn.Module, hidden: torch.Tensor, ctx) -> None:
            prefix = f"layers.{index}."
            for name in (n.removeprefix(prefix) for n in targets if n.startswith(prefix)):
                linear = work.get_submodule(name)
                inputs = capture_input(work, linear, hidden, ctx)  # (S*T, K)
                linear.weight.copy_(_prune_calibrated(linear.weight, inputs, config))
                del inputs
            write_back(work, model.layers[index])

        run_layers(model, hidden, ctx, convert, config.method)
    return {"sparsity": {name: measured_sparsity(linear.weight) for name, linear in targets.items()}}


def _prune_by_magnitude(targets: dict[str, nn.Linear], config: PruneConfig) -> None:
    scores = {name: magnitude_scores(linear.weight) for name, linear in targets.items()}
    if config.scope == "global":
        masks = global_masks(scores, config.sparsity)
    else:
        masks = {name: select_mask(score, config) for name, score in scores.items()}
    for name, linear in targets.items():
        linear.weight.mul_(masks[name].to(linear.weight.dtype).to(linear.weight.device))


def _prune_calibrated(weight: torch.Tensor, inputs: torch.Tensor, config: PruneConfig) -> torch.Tensor:
    if config.method == "wanda":
        return weight * select_mask(wanda_scores(weight, inputs), config)
    hessian, count = None, 0
    for chunk in inputs.split(2048):
        hessian, count = accumulate_hessian(hessian, count, chunk)
    return sparsegpt_prune(weight, hessian, config.sparsity, config.nm, config.scope, config.damp)

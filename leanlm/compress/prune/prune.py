"""`prune(llm, PruneConfig(...))`: prune `llm` in place and return a report of what changed.

Unstructured and N:M methods zero weights and keep every shape (unstructured.py); structured methods build a
smaller dense model and swap it in (structured.py, rebuild.py).
"""

from __future__ import annotations

import time

from leanlm.compress.prune.config import UNSTRUCTURED, PruneConfig
from leanlm.errors import InvalidRequestError


def parameter_counts(model) -> dict:
    """All parameters (a tied LM head counted once) and the nonzero ones."""
    params = {id(p): p for p in model.parameters()}.values()
    return {"total": sum(p.numel() for p in params), "nonzero": sum(int((p != 0).sum()) for p in params)}


def prune(llm, config: PruneConfig, calibration_ids: list[list[int]] | None = None) -> dict:
    from leanlm.layers.quantized_linear import QuantizedLinear

    if any(isinstance(m, QuantizedLinear) for m in llm.model.modules()):
        raise InvalidRequestError(
            "The model is quantized; pruning needs float weights. Prune the original first, then quantize the "
            "pruned folder with `leanlm quantize --model <pruned folder>`."
        )
    before = parameter_counts(llm.model)
    started = time.perf_counter()
    if config.method in UNSTRUCTURED:
        from leanlm.compress.prune.unstructured import prune_unstructured

        report = prune_unstructured(llm, config, calibration_ids)
    else:
        from leanlm.compress.prune.rebuild import install_model
        from leanlm.compress.prune.structured import prune_structure

        new_config, weights, report = prune_structure(llm, config, calibration_ids)
        install_model(llm, new_config, weights)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["parameters"] = {"before": before, "after": parameter_counts(llm.model)}
    return report

"""Per-layer sensitivity: the KL of the final logits when one layer (or one tensor) alone is quantized.

The probe runs the float model once on calibration text (c4, never the evaluation text) and keeps each decoder
layer's input; quantizing the linears of layer i then only reruns layers i..L-1. Each group is quantized by
round-to-nearest at each probed bit width (the same group size and symmetry the artifact will use), its weights
swapped in, the logits compared with the original's, and the original weights put back.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlm.compress.config import QuantConfig
from leanlm.compress.rtn import quantize_rtn
from leanlm.compress.targets import target_linears


def probe_groups(model: nn.Module, config: QuantConfig) -> dict[str, list[str]]:
    """{group: [linear names]}: one group per decoder layer ("layers.3") and the LM head, or one per linear."""
    groups: dict[str, list[str]] = {}
    for name in target_linears(model, config):
        if config.mixed_granularity == "tensor" or not name.startswith("layers."):
            key = name
        else:
            key = ".".join(name.split(".")[:2])
        groups.setdefault(key, []).append(name)
    return groups


def first_layer(group: str) -> int | None:
    """The decoder layer a group starts in, None for the LM head (only the head reruns)."""
    parts = group.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


class _Tail:
    """The float model from any layer's input to the final log-probabilities."""

    def __init__(self, model: nn.Module, ids: torch.Tensor):
        self.model = model
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        x = model.embed(ids).float()
        self.ctx = model.forward_context(positions, x.dtype)
        self.inputs = []  # layer i's input; inputs[L] is the last layer's output
        for layer in model.layers:
            self.inputs.append(x)
            x = layer(x, self.ctx)
        self.inputs.append(x)

    def log_probs(self, start: int | None) -> torch.Tensor:
        """(S*T, V) log-probabilities, rerunning the layers from `start` (None: from the final norm)."""
        x = self.inputs[-1]
        if start is not None:
            x = self.inputs[start]
            for layer in self.model.layers[start:]:
                x = layer(x, self.ctx)
        logits = self.model.lm_head(self.model.norm(x)).float()
        if cap := self.model.spec.logit_softcap:
            logits = torch.tanh(logits / cap) * cap
        return logits.reshape(-1, logits.shape[-1]).log_softmax(-1)


@torch.inference_mode()
def layer_sensitivity(
    model: nn.Module, config: QuantConfig, ids: torch.Tensor, bits: tuple[int, ...], progress: bool = False
) -> dict[str, dict[int, float]]:
    """{group: {bits: mean KL(original || group quantized) in nats per token}} on the (S, T) token ids `ids`.
    `model` must hold float (dense) linears, as compress/ loads it."""
    tail = _Tail(model, ids)
    reference = tail.log_probs(None)
    groups = probe_groups(model, config)
    report: dict[str, dict[int, float]] = {}
    for group, names in _progress(groups.items(), progress):
        linears = {name: model.get_submodule(name) for name in names}
        originals = {name: linear.weight for name, linear in linears.items()}
        report[group] = {}
        try:
            for b in bits:
                for name, linear in linears.items():
                    weight = originals[name].detach().float()
                    quantized = quantize_rtn(weight, b, config.group_size, config.symmetric_at(b))
                    # A new Parameter rather than an in-place copy: the head may share its tensor with the embedding.
                    linear.weight = nn.Parameter(quantized.dequantize(originals[name].dtype), requires_grad=False)
                report[group][b] = mean_kl(reference, tail.log_probs(first_layer(group)))
        finally:
            for name, linear in linears.items():
                linear.weight = originals[name]
    return report


def mean_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Mean over rows of KL(p || q) for (n, V) log-probabilities, in nats (evaluate/'s token_kl, one level down)."""
    p = p_log.exp()
    return float(torch.where(p > 0, p * (p_log - q_log), 0.0).sum(-1).clamp_min(0.0).mean())


def _progress(items, enabled: bool):
    import sys

    from tqdm import tqdm

    items = list(items)
    return tqdm(items, desc="sensitivity", unit="group", file=sys.stderr, disable=not enabled, dynamic_ncols=True)

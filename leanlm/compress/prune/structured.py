"""Structured pruning: remove attention heads, MLP channels or whole decoder layers. The result is an ordinary,
smaller dense model: every layer keeps the same shape, so one config.json describes it.

Two streams run through the layers on calibration text: the original model's hidden states and the pruned
model's. At each layer the pruned stream picks what to remove (by measured output energy). With `repair`, ridge
least-squares refits (repair.py) of the kept projections: a layer that loses heads gets an o_proj that rebuilds
its own attention output from the kept heads; a layer that loses MLP channels, and every layer once a dropped
layer or an MLP change has moved the pruned stream, gets a down_proj (and o_proj) that make the pruned residual
stream match the original's at the same depth, which also absorbs what dropped layers contributed. These targets
were chosen by measurement on SmolLM2-135M (numbers at each choice).

Grouped-query attention: query head h reads key/value head h // group. Heads go either as equal numbers of query
heads in every group (KV heads stay) or as whole groups (their query heads and their key/value head).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from leanlm.compress.calibrated import calibration_inputs, calibration_tensor, capture_input, layer_progress
from leanlm.compress.prune.config import PruneConfig
from leanlm.compress.prune.layer_drop import choose_layers
from leanlm.compress.prune.repair import refit
from leanlm.config import ModelConfig
from leanlm.errors import InvalidRequestError

CHANNEL_MULTIPLE = 32  # kept MLP width rounds to this, so quantization groups and kernels see friendly sizes


@dataclass(frozen=True)
class Shape:
    """What every kept layer keeps."""

    heads_per_group: int  # query heads per key/value head
    num_kv_heads: int
    intermediate_size: int

    @property
    def num_heads(self) -> int:
        return self.heads_per_group * self.num_kv_heads


def target_shape(model_config: ModelConfig, config: PruneConfig) -> Shape:
    """The uniform layer shape `config` asks for, rounded to what grouped-query attention allows."""
    group = model_config.num_heads // model_config.num_kv_heads
    per_group, kv_heads = group, model_config.num_kv_heads
    if config.drop_heads:
        if config.head_unit == "query":
            per_group = group - max(1, round(config.drop_heads * group))
        else:
            kv_heads -= max(1, round(config.drop_heads * kv_heads))
        if per_group < 1 or kv_heads < 1:
            raise InvalidRequestError(
                f"--drop-heads {config.drop_heads:g} would remove every head ({model_config.num_heads} query heads in "
                f"{model_config.num_kv_heads} groups of {group}). Use a smaller fraction, or --head-unit "
                f"{'kv' if config.head_unit == 'query' else 'query'}."
            )
    width = model_config.intermediate_size
    if config.drop_mlp:
        kept = width - max(1, round(config.drop_mlp * width))
        if width >= 2 * CHANNEL_MULTIPLE:
            kept = max(CHANNEL_MULTIPLE, round(kept / CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE)
        if kept >= width:
            kept = width - CHANNEL_MULTIPLE
        if kept < 1:
            raise InvalidRequestError(f"--drop-mlp {config.drop_mlp:g} would remove every MLP channel; use less.")
        width = kept
    return Shape(per_group, kv_heads, width)


# ---- importance ---------------------------------------------------------------------------------------------------


def head_energy(o_inputs: torch.Tensor, o_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """o_inputs (n, H*D), o_weight (hidden, H*D) -> (H,) mean squared norm of each head's share of o_proj's output."""
    x = o_inputs.view(o_inputs.shape[0], num_heads, -1)  # (n, H, D)
    w = o_weight.view(o_weight.shape[0], num_heads, -1)  # (hidden, H, D)
    return torch.stack([(x[:, h] @ w[:, h].T).pow(2).sum(-1).mean() for h in range(num_heads)])


def channel_energy(down_inputs: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """down_inputs (n, I), down_weight (hidden, I) -> (I,) mean a_j^2 ||W[:, j]||^2, channel j's output energy."""
    return down_inputs.pow(2).mean(0) * down_weight.pow(2).sum(0)


def choose_heads(energy: torch.Tensor, num_kv_heads: int, shape: Shape) -> tuple[list[int], list[int]]:
    """(H,) energies -> (kept query heads, kept key/value heads), each in ascending order, query heads grouped by
    their key/value head as attention expects."""
    group = energy.numel() // num_kv_heads
    per_group = energy.view(num_kv_heads, group)
    kv_kept = sorted(per_group.sum(1).topk(shape.num_kv_heads).indices.tolist())
    q_kept = []
    for kv in kv_kept:
        q_kept += sorted((kv * group + per_group[kv].topk(shape.heads_per_group).indices).tolist())
    return q_kept, kv_kept


# ---- the two-stream driver ----------------------------------------------------------------------------------------


@torch.inference_mode()
def prune_structure(
    llm, config: PruneConfig, calibration_ids: list[list[int]] | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """Returns (the smaller model's config, its weights in leanlm's fused names, a report). `llm` is unchanged."""
    model, model_config = llm.model, llm.config
    if features := model.spec.beyond_llama(model_config.head_dim):
        raise InvalidRequestError(
            f"Structured pruning and layer dropping rebuild Llama's layer, and {model_config.model_type} has "
            f"{', '.join(features)}. Use unstructured pruning (magnitude, wanda, sparsegpt) for this model."
        )
    if not model.spec.uniform and config.method == "layers":
        raise InvalidRequestError(
            "Dropping layers from a model whose layers differ (per-layer windows or rope) would shift its layer "
            "pattern. Use structured --drop-heads / --drop-mlp or unstructured pruning for this model."
        )
    shape = target_shape(model_config, config)  # method "layers": every layer keeps its shape
    hidden, ctx = calibration_inputs(model, calibration_tensor(llm, config, calibration_ids))
    dropped, layer_scores = [], []
    if config.method == "layers":
        dropped, layer_scores = choose_layers(model, hidden, ctx, config.drop_layers, config.layer_score)
    weights = {
        name: t.detach().float().cpu().clone()
        for name, t in model.state_dict().items()
        if not name.startswith("layers.")
    }
    if model.lm_head.weight is model.embed_tokens.weight:
        weights.pop("lm_head.weight", None)  # tied: the loader ties it back
    kept_layers: list[dict] = []
    reference = hidden  # the original model's stream
    # Has a dropped layer or an MLP change moved the pruned stream away from the original's? From then on every
    # layer's repair aims at the original stream. Head removal alone does not count: refitting later layers
    # towards the original stream after it measured worse (SmolLM2, 25% of heads: KL 0.36 against 0.29).
    drifted = False
    for index, layer in enumerate(layer_progress(model.layers, config.method)):
        original = copy.deepcopy(layer).float().cpu()
        reference_mid = reference_out = None  # the original stream: only repair needs it
        if config.repair:
            reference_mid = reference + original.self_attn(original.input_layernorm(reference), ctx)
            reference_out = reference_mid + original.mlp(original.post_attention_layernorm(reference_mid))
        if index in dropped:
            drifted = True
        else:
            prefix = f"layers.{len(kept_layers)}."
            layer_weights, hidden, kept = _prune_layer(
                original, hidden, ctx, reference_mid, reference_out, shape, config, drifted
            )
            weights |= {prefix + name: t for name, t in layer_weights.items()}
            kept_layers.append(kept)
            drifted = drifted or kept["drifts"]
        reference = reference_out
        del original
    new_config = model_config.replace(
        num_layers=len(kept_layers),
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        intermediate_size=shape.intermediate_size,
    )
    report = {
        "num_layers": [model_config.num_layers, new_config.num_layers],
        "num_heads": [model_config.num_heads, new_config.num_heads],
        "num_kv_heads": [model_config.num_kv_heads, new_config.num_kv_heads],
        "intermediate_size": [model_config.intermediate_size, new_config.intermediate_size],
        "dropped_layers": dropped,
        "layer_scores": [round(s, 6) for s in layer_scores],
        "kept_heads": [k["heads"] for k in kept_layers],
        "repair": config.repair,
    }
    return new_config, weights, report


def _prune_layer(
    original: nn.Module,
    hidden: torch.Tensor,
    ctx,
    reference_mid: torch.Tensor | None,
    reference_out: torch.Tensor | None,
    shape: Shape,
    config: PruneConfig,
    drifted: bool,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    """One kept layer on the pruned stream `hidden` (S, T, hidden) -> (its weights, its output, what it kept)."""
    attn, mlp = original.self_attn, original.mlp
    head_dim, heads, kv_heads = attn.head_dim, attn.num_heads, attn.num_kv_heads
    # Heads are independent: dropping some leaves the others' outputs, o_proj's input columns, unchanged.
    o_in = capture_input(original, attn.o_proj, hidden, ctx)  # (n, H*D)
    q_kept, kv_kept = list(range(heads)), list(range(kv_heads))
    if shape.num_heads < heads:
        q_kept, kv_kept = choose_heads(head_energy(o_in, attn.o_proj.weight, heads), kv_heads, shape)
    o_cols = _head_columns(q_kept, head_dim)
    qkv_rows = torch.cat(
        [
            o_cols,
            heads * head_dim + _head_columns(kv_kept, head_dim),
            (heads + kv_heads) * head_dim + _head_columns(kv_kept, head_dim),
        ]
    )
    x_o = o_in[:, o_cols]
    w_o = attn.o_proj.weight[:, o_cols]
    heads_changed = shape.num_heads < heads
    if config.repair and heads_changed:
        # The layer's own attention output as target: measured better than the original stream's for heads
        # (SmolLM2, 25% of heads: KL 0.29 against 0.33, and 1.15 without repair).
        w_o = refit(w_o, x_o, o_in @ attn.o_proj.weight.T, config.repair_ridge)
    elif config.repair and drifted:
        w_o = refit(w_o, x_o, (reference_mid - hidden).reshape(x_o.shape[0], -1), config.repair_ridge)
    mid = hidden + (x_o @ w_o.T).view_as(hidden)

    width = mlp.down_proj.in_features
    down_in = _input_of(mlp.down_proj, lambda: mlp(original.post_attention_layernorm(mid)))  # (n, I)
    channels = torch.arange(width)
    if shape.intermediate_size < width:
        channels = channel_energy(down_in, mlp.down_proj.weight).topk(shape.intermediate_size).indices.sort().values
    x_d = down_in[:, channels]
    w_d = mlp.down_proj.weight[:, channels]
    bias = mlp.down_proj.bias
    mlp_changed = shape.intermediate_size < width
    if config.repair and (drifted or mlp_changed):
        # The original stream as target: the refit also absorbs earlier layers' errors and dropped layers.
        target = (reference_out - mid).reshape(x_d.shape[0], -1)
        w_d = refit(w_d, x_d, target if bias is None else target - bias, config.repair_ridge)
    out = (x_d @ w_d.T).view_as(mid) + mid
    if bias is not None:
        out = out + bias

    weights = {
        "input_layernorm.weight": original.input_layernorm.weight,
        "post_attention_layernorm.weight": original.post_attention_layernorm.weight,
        "self_attn.qkv_proj.weight": attn.qkv_proj.weight[qkv_rows],
        "self_attn.o_proj.weight": w_o,
        "mlp.gate_up_proj.weight": mlp.gate_up_proj.weight[torch.cat([channels, width + channels])],
        "mlp.down_proj.weight": w_d,
    }
    if attn.qkv_proj.bias is not None:
        weights["self_attn.qkv_proj.bias"] = attn.qkv_proj.bias[qkv_rows]
    if mlp.gate_up_proj.bias is not None:
        weights["mlp.gate_up_proj.bias"] = mlp.gate_up_proj.bias[torch.cat([channels, width + channels])]
    if bias is not None:
        weights["mlp.down_proj.bias"] = bias
    weights = {name: t.detach().clone().contiguous() for name, t in weights.items()}
    return weights, out, {"heads": q_kept, "drifts": mlp_changed}


def _head_columns(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row/column indices of the given heads in a (heads * head_dim) axis."""
    return (torch.tensor(heads).unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


def _input_of(linear: nn.Module, run) -> torch.Tensor:
    """The (n, K) input `linear` sees while `run()` executes."""
    captured: list[torch.Tensor] = []
    handle = linear.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        run()
    finally:
        handle.remove()
    return captured[0].reshape(-1, captured[0].shape[-1])

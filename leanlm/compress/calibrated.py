"""Calibrated quantization (GPTQ, AWQ): run calibration text through the model one decoder layer at a time and
quantize each layer's linears from the inputs they really see.

The driver keeps one (S, T, hidden) activation tensor: layer i's inputs are layer i-1's outputs, computed after
layer i-1 was converted (GPTQ: with its quantized weights, as in the paper; AWQ: with its rescaled float weights).
Everything runs in float32 on CPU on a copy of each layer, whatever the model's dtype and device.

GPTQ quantizes a layer's linears in execution order (qkv, o, gate_up, down), each from inputs computed with the
ones before it already quantized; the LM head gets GPTQ too, from the final norm's outputs. On SmolLM2-135M, act_order
roughly halves GPTQ's KL (tests/numerics/test_calibrated_quant.py).
AWQ folds its scales into what precedes each linear: input_layernorm -> qkv, v rows -> o_proj (scales shared per
kv head), post_attention_layernorm -> gate_up, up rows -> down_proj, final norm -> lm_head (untied from the
embedding first). The folded weights are written back into `llm.model`, so its float function is unchanged;
`quantize.install` then swaps only the linears. No clipping search: weights are rounded over their full range.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import torch
from torch import nn

from leanlm.compress.awq import search_scales, tie_heads
from leanlm.compress.config import QuantConfig
from leanlm.compress.gptq import accumulate_hessian, gptq_quantize, single_thread
from leanlm.compress.rtn import check_group_size, quantize_rtn
from leanlm.compress.targets import target_linears
from leanlm.errors import InvalidRequestError
from leanlm.layers.quantized_linear import QuantizedTensor
from leanlm.models.base import ForwardContext


class _Captured(Exception):
    """Raised by a hook once it has the input it wanted: the rest of the layer need not run."""


@torch.inference_mode()
def quantize_weights_calibrated(
    llm, config: QuantConfig, calibration_ids: list[list[int]] | None = None
) -> dict[str, QuantizedTensor]:
    """GPTQ or AWQ for every target linear of `llm.model`; returns {module name: QuantizedTensor}."""
    if config.method not in ("gptq", "awq"):
        raise InvalidRequestError(f"Calibrated quantization covers gptq and awq, not '{config.method}'.")
    model = llm.model
    if config.method == "awq" and (features := model.spec.beyond_llama(model.config.head_dim)):
        raise InvalidRequestError(
            f"AWQ folds its scales into the norm before each linear, and {model.config.model_type} has "
            f"{', '.join(features)}. Use --method gptq or int4/int8 (round-to-nearest) for this model."
        )
    targets = target_linears(model, config)
    for name, linear in targets.items():  # fail before minutes of calibration, not after
        try:
            check_group_size(linear.in_features, config.group_size)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"{name}: {exc}") from None
    hidden, ctx = calibration_inputs(model, calibration_tensor(llm, config, calibration_ids))

    quantized: dict[str, QuantizedTensor] = {}

    def convert(index: int, work: nn.Module, hidden: torch.Tensor, ctx: ForwardContext) -> None:
        prefix = f"layers.{index}."
        names = [n.removeprefix(prefix) for n in targets if n.startswith(prefix)]
        if config.method == "gptq":
            layer = gptq_layer(work, hidden, ctx, names, config, prefix)
        else:
            layer = awq_layer(work, hidden, ctx, names, config, prefix)
        for name, weight in layer.items():
            quantized[prefix + name] = weight
        if config.method == "awq":
            write_back(work, model.layers[index])

    hidden = run_layers(model, hidden, ctx, convert, config.method)
    if "lm_head" in targets:
        norm = copy.deepcopy(model.norm).float().cpu()
        head = model.lm_head.weight.detach().float().cpu().clone()  # a copy: the head may be the tied embedding
        inputs = norm(hidden).reshape(-1, hidden.shape[-1])
        if config.method == "gptq":
            quantized["lm_head"] = _gptq_linear(head, inputs, config, "lm_head")
        else:
            quantized["lm_head"] = awq_head(model, norm, head, inputs, config)
    return quantized


def calibration_inputs(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, ForwardContext]:
    """(S, T, hidden) float32 CPU embeddings of the (S, T) token ids, and the context that runs layers on them."""
    hidden = model.embed(ids.to(model.embed_tokens.weight.device)).float().cpu()
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return hidden, model.forward_context(positions, torch.float32)


def run_layers(
    model: nn.Module,
    hidden: torch.Tensor,
    ctx: ForwardContext,
    convert: Callable[[int, nn.Module, torch.Tensor, ForwardContext], None],
    desc: str,
) -> torch.Tensor:
    """The layer-by-layer driver: `convert(index, work, hidden, ctx)` changes `work`, a float32 CPU copy of layer
    `index`, from the inputs it really sees; the converted copy's output feeds the next layer. Returns the last
    layer's output (S, T, hidden). Writing `work` back into the model is the caller's choice."""
    for index, layer in enumerate(layer_progress(model.layers, desc)):
        work = copy.deepcopy(layer).float().cpu()
        convert(index, work, hidden, ctx)
        hidden = work(hidden, ctx)
        del work
    return hidden


def calibration_tensor(llm, config: QuantConfig, calibration_ids: list[list[int]] | None) -> torch.Tensor:
    """(S, T) token ids: the given sequences, or `calibration_samples` windows of c4 text picked with `seed`."""
    if calibration_ids is not None:
        lengths = {len(seq) for seq in calibration_ids}
        if not calibration_ids or len(lengths) != 1 or 0 in lengths:
            raise InvalidRequestError("calibration_ids must be a non-empty list of equally long, non-empty sequences.")
        return torch.tensor(calibration_ids, dtype=torch.long)
    from leanlm.formats.corpus import calibration_text

    tokens = torch.tensor(llm.tokenizer.encode(calibration_text(quiet=True)), dtype=torch.long)
    length, samples = config.calibration_length, config.calibration_samples
    if tokens.numel() < length + 1:
        raise InvalidRequestError(
            f"The calibration text has {tokens.numel()} tokens, fewer than calibration_length={length}. "
            "Use a shorter calibration_length."
        )
    generator = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, tokens.numel() - length, (samples,), generator=generator)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])


# ---- GPTQ ---------------------------------------------------------------------------------------------------------


def gptq_layer(
    work: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, names: list[str], config: QuantConfig, prefix: str = ""
) -> dict[str, QuantizedTensor]:
    """Quantize the layer's linears in execution order; each one's weights are replaced by their dequantized values
    so the next one's inputs (and the next layer's) see the quantized layer. `prefix` names the layer in errors."""
    quantized = {}
    for name in names:
        linear = work.get_submodule(name)
        inputs = capture_input(work, linear, hidden, ctx)
        quantized[name] = _gptq_linear(linear.weight, inputs, config, prefix + name)
        linear.weight.copy_(quantized[name].dequantize())
        del inputs
    return quantized


def _gptq_linear(weight: torch.Tensor, inputs: torch.Tensor, config: QuantConfig, name: str) -> QuantizedTensor:
    hessian, count = None, 0
    for chunk in inputs.reshape(-1, inputs.shape[-1]).split(2048):
        hessian, count = accumulate_hessian(hessian, count, chunk)
    return gptq_quantize(
        weight,
        hessian,
        config.bits_for(name),
        config.group_size,
        config.symmetric_for(name),
        config.damp,
        config.act_order,
        name=name,
    )


# ---- AWQ ----------------------------------------------------------------------------------------------------------


def awq_layer(
    work: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, names: list[str], config: QuantConfig, prefix: str = ""
) -> dict[str, QuantizedTensor]:
    """Search and fold the four scale vectors of a Llama decoder layer, then round the rescaled weights
    (each linear at its own bits: `prefix` + its name in config.bits_for)."""
    attn, mlp = work.self_attn, work.mlp
    # Folding never changes another linear's input, so one float pass captures all four.
    qkv_in, o_in, gate_up_in, down_in = capture_inputs(
        work, [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj], hidden, ctx
    )
    search = _searcher(config, prefix)
    q_size = attn.num_heads * attn.head_dim
    kv_size = attn.num_kv_heads * attn.head_dim
    tie, to_v = tie_heads(attn.num_heads, attn.num_kv_heads)

    _fold_into_norm(work.input_layernorm, attn.qkv_proj, search(qkv_in, attn.qkv_proj.weight, "self_attn.qkv_proj"))
    o_scales = search(o_in, attn.o_proj.weight, "self_attn.o_proj", tie=tie)
    attn.qkv_proj.weight[q_size + kv_size :].div_(to_v(o_scales).unsqueeze(1))  # v rows: (H_kv * D, hidden)
    if attn.qkv_proj.bias is not None:
        attn.qkv_proj.bias[q_size + kv_size :].div_(to_v(o_scales))
    attn.o_proj.weight.mul_(o_scales)
    gate_up_scales = search(gate_up_in, mlp.gate_up_proj.weight, "mlp.gate_up_proj")
    _fold_into_norm(work.post_attention_layernorm, mlp.gate_up_proj, gate_up_scales)
    down_scales = search(down_in, mlp.down_proj.weight, "mlp.down_proj")
    up = slice(mlp.intermediate_size, 2 * mlp.intermediate_size)
    mlp.gate_up_proj.weight[up].div_(down_scales.unsqueeze(1))
    if mlp.gate_up_proj.bias is not None:
        mlp.gate_up_proj.bias[up].div_(down_scales)
    mlp.down_proj.weight.mul_(down_scales)
    del qkv_in, o_in, gate_up_in, down_in
    return {
        name: quantize_rtn(
            work.get_submodule(name).weight,
            config.bits_for(prefix + name),
            config.group_size,
            config.symmetric_for(prefix + name),
        )
        for name in names
    }


def awq_head(model: nn.Module, norm: nn.Module, head: torch.Tensor, inputs: torch.Tensor, config: QuantConfig):
    """Scale the LM head against the final norm. A head tied to the embedding is untied first: the embedding
    lookup must keep the unscaled rows."""
    scales = _searcher(config)(inputs, head, "lm_head")
    norm.weight.div_(scales)
    model.norm.weight.copy_(norm.weight.to(model.norm.weight.dtype))
    scaled = head * scales
    reference = model.lm_head.weight
    model.lm_head.weight = nn.Parameter(scaled.to(reference.dtype).to(reference.device), requires_grad=False)
    return quantize_rtn(scaled, config.bits_for("lm_head"), config.group_size, config.symmetric_for("lm_head"))


def _searcher(config: QuantConfig, prefix: str = ""):
    """search(x, weight, name) -> AWQ's scales for the linear `prefix + name` at its own bits."""

    def search(x: torch.Tensor, weight: torch.Tensor, name: str, tie=None) -> torch.Tensor:
        bits, symmetric = config.bits_for(prefix + name), config.symmetric_for(prefix + name)
        with single_thread():  # ~100 small matmuls and roundings per layer: threads cost more than they give
            return search_scales(x, weight, bits, config.group_size, symmetric, tie=tie).scales

    return search


def _fold_into_norm(norm: nn.Module, linear: nn.Linear, scales: torch.Tensor) -> None:
    """RMSNorm(x) * w / s feeds W * s: the same product, with W's large-input columns scaled up before rounding."""
    norm.weight.div_(scales)
    linear.weight.mul_(scales)


def write_back(work: nn.Module, layer: nn.Module) -> None:
    """Copy the folded float32 weights into the model's own layer, in its dtype and on its device."""
    for name, param in layer.named_parameters():
        param.data.copy_(work.get_parameter(name).to(param.dtype))


# ---- shared -------------------------------------------------------------------------------------------------------


def capture_input(work: nn.Module, linear: nn.Module, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """The (S*T, K) input `linear` sees when the layer runs on `hidden`; stops the layer right there."""

    def hook(module, args):
        captured.append(args[0].reshape(-1, args[0].shape[-1]))
        raise _Captured

    captured: list[torch.Tensor] = []
    handle = linear.register_forward_pre_hook(hook)
    try:
        work(hidden, ctx)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured[0]


def capture_inputs(
    work: nn.Module, linears: list[nn.Module], hidden: torch.Tensor, ctx: ForwardContext
) -> list[torch.Tensor]:
    """The (S*T, K) inputs of several linears from one forward pass of the layer."""
    captured: dict[int, torch.Tensor] = {}

    def hook(module, args):
        captured[id(module)] = args[0].reshape(-1, args[0].shape[-1])

    handles = [linear.register_forward_pre_hook(hook) for linear in linears]
    try:
        work(hidden, ctx)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[id(linear)] for linear in linears]


def layer_progress(layers, method: str):
    from tqdm import tqdm

    return tqdm(layers, desc=f"{method} layers", unit="layer", file=sys.stderr, dynamic_ncols=True)

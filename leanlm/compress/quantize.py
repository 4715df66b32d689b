"""`quantize(llm, QuantConfig(...))`: replace the model's linear layers by QuantizedLinear, in place.

Two steps, as gpt-fast does: a method turns float weights into QuantizedTensors (round-to-nearest here,
GPTQ/AWQ with calibration data), then `install` swaps the modules and prepares the runtime kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlm.compress.config import QuantConfig
from leanlm.compress.rtn import quantize_rtn
from leanlm.compress.targets import head_ties_embedding, target_linears
from leanlm.layers.quantized_linear import QuantizedLinear, QuantizedTensor
from leanlm.models.registry import prepare_runtime

__all__ = ["install", "quantize", "quantize_weights_rtn", "target_linears"]


def install(model: nn.Module, quantized: dict[str, QuantizedTensor]) -> None:
    """Swap each named nn.Linear for a QuantizedLinear; registry.prepare_runtime then picks the kernels."""
    reference = model.embed_tokens.weight
    for name, weight in quantized.items():
        old = model.get_submodule(name)
        bias = None if old.bias is None else old.bias.detach().float()
        model.set_submodule(name, QuantizedLinear(weight, bias).to(reference.device))


def quantize_weights_rtn(model: nn.Module, config: QuantConfig) -> dict[str, QuantizedTensor]:
    return {
        name: quantize_rtn(
            linear.weight.detach().float().cpu(), config.bits_for(name), config.group_size, config.symmetric_for(name)
        )
        for name, linear in target_linears(model, config).items()
    }


def half_parameters(weight: QuantizedTensor) -> QuantizedTensor:
    """Scale and offset rounded to float16, as the artifact stores them: the model in memory is the saved one."""
    offset = None if weight.offset is None else weight.offset.half().float()
    return QuantizedTensor(weight.codes, weight.scale.half().float(), offset, weight.bits, weight.group_size)


EMBEDDING_GROUP = 32


def embedding_codes(model: nn.Module, bits: int) -> QuantizedTensor:
    """The token embedding's rows rounded in groups of 32 (symmetric above 4 bits), parameters in float16."""
    table = model.embed_tokens.weight.detach().float().cpu()
    return half_parameters(quantize_rtn(table, bits, EMBEDDING_GROUP, symmetric=bits > 4))


def quantize_embedding(model: nn.Module, weight: QuantizedTensor, tied_head: bool) -> None:
    """Make the model's table the dequantized values of `weight`; `embed_tokens.quantized` keeps the codes for the
    artifact (compress/artifact.py), whose loader dequantizes them back to exactly this table. `tied_head`: the LM
    head runs on these same codes, and the artifact stores them once."""
    table = model.embed_tokens.weight
    # A new parameter: a dense LM head tied to the old table keeps it.
    model.embed_tokens.weight = nn.Parameter(weight.dequantize(table.dtype).to(table.device), requires_grad=False)
    model.embed_tokens.quantized = weight
    model.embed_tokens.ties_head = tied_head


@torch.inference_mode()
def quantize(llm, config: QuantConfig, calibration_ids: list[list[int]] | None = None) -> dict:
    """Quantize `llm` (a leanlm.LLM) in place. Returns a small report (method, sizes before and after)."""
    model = llm.model
    tied = head_ties_embedding(model, config)
    targets = target_linears(model, config) | ({"lm_head": model.lm_head} if tied else {})
    before = sum(m.weight.numel() * m.weight.element_size() for m in targets.values())
    if config.method in ("int8", "int4"):
        quantized = quantize_weights_rtn(model, config)
    else:
        from leanlm.compress.calibrated import quantize_weights_calibrated

        quantized = quantize_weights_calibrated(llm, config, calibration_ids)
    quantized = {name: half_parameters(weight) for name, weight in quantized.items()}
    embedding = (
        embedding_codes(model, config.embedding_bits) if config.embedding_bits and config.include_lm_head else None
    )
    if tied:
        quantized["lm_head"] = embedding
    after = sum(w.storage_bytes() for w in quantized.values())
    install(model, quantized)
    report = {"quantized_layers": len(quantized), "dense_bytes": before, "quantized_bytes": after}
    # Run as the saved artifact will load: float32 activations around leanlm's kernels (bfloat16 -> float32 is
    # exact for the dense tensors), so saving and reloading changes no logit.
    llm.plan = llm.plan.for_weights(quantized=True)
    prepare_runtime(model, llm.plan)
    if embedding is not None:  # after: the table is at the compute dtype, as on reload
        quantize_embedding(model, embedding, tied)
        report["embedding_bytes"] = 0 if tied else embedding.storage_bytes()  # tied: counted as the head
    return report

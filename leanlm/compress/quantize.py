"""`quantize(llm, QuantConfig(...))`: replace the model's linear layers by QuantizedLinear, in place.

Two steps, as gpt-fast does: a method turns float weights into QuantizedTensors (round-to-nearest here,
GPTQ/AWQ with calibration data), then `install` swaps the modules and prepares the runtime kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlm.compress.config import QuantConfig
from leanlm.compress.rtn import quantize_rtn
from leanlm.compress.targets import target_linears
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


def quantize_embedding(model: nn.Module, bits: int) -> QuantizedTensor:
    """Round the token embedding's rows (groups of 32, symmetric above 4 bits) and make the model's table their
    dequantized values; `embed_tokens.quantized` keeps the codes for the artifact (compress/artifact.py), which the
    loader dequantizes back to exactly this table."""
    table = model.embed_tokens.weight
    weight = half_parameters(quantize_rtn(table.detach().float().cpu(), bits, EMBEDDING_GROUP, symmetric=bits > 4))
    # A new parameter: a dense LM head tied to the old table keeps it.
    model.embed_tokens.weight = nn.Parameter(weight.dequantize(table.dtype).to(table.device), requires_grad=False)
    model.embed_tokens.quantized = weight
    return weight


@torch.inference_mode()
def quantize(llm, config: QuantConfig, calibration_ids: list[list[int]] | None = None) -> dict:
    """Quantize `llm` (a leanlm.LLM) in place. Returns a small report (method, sizes before and after)."""
    model = llm.model
    before = sum(m.weight.numel() * m.weight.element_size() for m in target_linears(model, config).values())
    if config.method in ("int8", "int4"):
        quantized = quantize_weights_rtn(model, config)
    else:
        from leanlm.compress.calibrated import quantize_weights_calibrated

        quantized = quantize_weights_calibrated(llm, config, calibration_ids)
    quantized = {name: half_parameters(weight) for name, weight in quantized.items()}
    after = sum(w.storage_bytes() for w in quantized.values())
    install(model, quantized)
    report = {"quantized_layers": len(quantized), "dense_bytes": before, "quantized_bytes": after}
    # Run as the saved artifact will load: float32 activations around leanlm's kernels (bfloat16 -> float32 is
    # exact for the dense tensors), so saving and reloading changes no logit.
    llm.plan = llm.plan.for_weights(quantized=True)
    prepare_runtime(model, llm.plan)
    if config.embedding_bits and config.include_lm_head:  # after: the table is at the compute dtype, as on reload
        report["embedding_bytes"] = quantize_embedding(model, config.embedding_bits).storage_bytes()
    return report

"""How an encoder's linear layers run: float32 (the reference), bf16, int8 (W8A8, dynamic per-token scales) or
int4 (leanlm's q4 kernel, groups of 32 with an offset). Embeddings, LayerNorms, attention and pooling stay as
they are (float32, or bf16 for the bf16 precision).

int8 smooths each layer's input channels (SmoothQuant, alpha 0.65) with their largest |x| over a few calibration
texts (c4, never the evaluation corpus): on all-MiniLM-L6-v2 the mean cosine to float32 goes from about 0.9975
to 0.999 (see BENCHMARKS.md)."""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

import torch
from torch import nn

from leanlm.errors import InvalidRequestError

PRECISIONS = ("float32", "bf16", "int8", "int4")


@cache
def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: oneDNN's bf16 matmul is then several times float32's; elsewhere it is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InvalidRequestError(f"Unknown precision {precision!r}. Choose among: {', '.join(PRECISIONS)}.")
    return precision


def calibration_batches(tokenizer, pad_id: int, count: int = 64, max_tokens: int = 128, batch_size: int = 16):
    """(input_ids, attention_mask) batches of c4 text (the calibration corpus) for `tokenizer`."""
    from leanlm.embed.batching import pad_batch
    from leanlm.formats.corpus import calibration_text

    lines = [line.strip() for line in calibration_text(quiet=True).splitlines() if len(line.split()) >= 8][:count]
    ids = [encoding.ids[:max_tokens] for encoding in tokenizer.encode_batch(lines)]
    return [pad_batch(ids[i : i + batch_size], pad_id)[:2] for i in range(0, len(ids), batch_size)]


def input_absmax(encoder: nn.Module, batches) -> dict[nn.Module, torch.Tensor]:
    """Each layer Linear's largest |input| per channel over the batches (real tokens only)."""
    maxima: dict[nn.Module, torch.Tensor] = {}
    real = {}

    def record(module, inputs):
        x = inputs[0].detach().float().abs()
        if real.get("mask") is not None and x.dim() == 3:
            x = x * real["mask"][..., None]
        channel_max = x.reshape(-1, x.shape[-1]).amax(dim=0)
        maxima[module] = torch.maximum(maxima[module], channel_max) if module in maxima else channel_max

    linears = [m for layer in encoder.layers for m in layer.children() if isinstance(m, nn.Linear)]
    handles = [linear.register_forward_pre_hook(record) for linear in linears]
    # One pass per batch on this thread: the hooks read the whole batch's mask and update `maxima` unguarded.
    encoder.tokens_per_pass, encoder.text_parallel = 1 << 30, False
    try:
        with torch.inference_mode():
            for ids, mask in batches:
                real["mask"] = mask.float()
                encoder(ids, mask)
    finally:
        for handle in handles:
            handle.remove()
        del encoder.tokens_per_pass, encoder.text_parallel  # back to the class's settings
    return maxima


def apply_precision(encoder: nn.Module, precision: str, calibration=None) -> nn.Module:
    """Swap the encoder layers' nn.Linear modules (not the classifier head) for `precision`'s; returns the encoder.
    `calibration`: (input_ids, attention_mask) batches that int8 smooths with (None: no smoothing)."""
    check_precision(precision)
    if precision != "bf16":
        use_short_attention(encoder)
    if precision == "float32":
        return use_onednn(encoder)
    if precision == "bf16":
        if not cpu_has_fast_bf16():
            warnings.warn(
                "This CPU has neither AVX-512 BF16 nor AMX: bf16 matmuls are emulated and slower than float32. "
                "Use --precision int8 or float32 here.",
                stacklevel=2,
            )
        for layer in encoder.layers:
            layer.to(torch.bfloat16)
        return encoder
    maxima = input_absmax(encoder, calibration) if precision == "int8" and calibration else {}
    for layer in encoder.layers:
        for name, child in list(layer.named_children()):
            if isinstance(child, nn.Linear):
                setattr(layer, name, _quantized(child, precision, maxima.get(child)))
        layer.adds_residual = precision == "int8"  # Int8DynamicLinear adds the residual in its epilogue
    return encoder


def use_short_attention(encoder: nn.Module) -> None:
    """float32 activations: short texts' attention on leanlm's kernel (models/encoder.SHORT_ATTENTION_TOKENS),
    where it is built; SDPA otherwise."""
    from leanlm.kernels.int8_rows import load_int8_rows

    available = load_int8_rows()
    for layer in encoder.layers:
        layer.short_attention = available


def use_onednn(encoder: nn.Module) -> nn.Module:
    """float32: the layers' products on oneDNN (layers/onednn_linear.py), `up` with its activation fused and
    attn_out / down with the residual added."""
    from leanlm.layers.onednn_linear import OneDNNLinear, onednn_linear_available

    if not onednn_linear_available():
        return encoder
    for layer in encoder.layers:
        for name, child in list(layer.named_children()):
            if isinstance(child, nn.Linear):
                fused_act = encoder.config.hidden_act if name == "up" else None
                setattr(layer, name, OneDNNLinear.from_linear(child, fused_act))
        layer.up_applies_act = layer.adds_residual = True
    return encoder


def _quantized(linear: nn.Linear, precision: str, absmax: torch.Tensor | None) -> nn.Module:
    if precision == "int8":
        from leanlm.layers.int8_linear import Int8DynamicLinear

        return Int8DynamicLinear.from_linear(linear, absmax)
    from leanlm.compress.rtn import quantize_rtn
    from leanlm.layers.quantized_linear import QuantizedLinear

    layer = QuantizedLinear(quantize_rtn(linear.weight, 4, 32, symmetric=False), linear.bias)
    layer.prepare_runtime(torch.float32, torch.device("cpu"), mode="auto")
    return layer

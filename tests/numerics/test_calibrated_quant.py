"""GPTQ and AWQ on the real default model (float32): each must beat round-to-nearest at the same bits and group size,
on the decoder layers' output error (mean over layers, on held-out c4) and on KL divergence from the float model over
wiki text.

The default model's width (576) splits into four groups of 128 and one of 64. Calibration uses 32 x 256
tokens: the methods' cost hardly depends on it, and 8 x 128 tokens leave down_proj's 1536-wide Hessian rank-deficient,
which makes GPTQ overfit.
"""

import sys
import time

import pytest
import torch

from leanlm import LLM
from leanlm.compress.config import QuantConfig
from leanlm.compress.quantize import quantize
from leanlm.evaluate import evaluate
from leanlm.evaluate.corpus import calibration_text, evaluation_text
from leanlm.layers.quantized_linear import QuantizedLinear

pytestmark = pytest.mark.slow

BITS, GROUP = 4, 128
SAMPLES, LENGTH = 32, 256
HELD_OUT = 2048  # the last c4 tokens: never calibrated on, they measure the layer errors
EVAL_TOKENS = 512
# int4 = round-to-nearest. GPTQ runs with act_order: without it, it beats RTN on KL but only just on the layer error
# (smaller v output errors, yet larger after attention averages them; tests/unit covers plain GPTQ).
METHODS = ("int4", "gptq-act-order", "awq")


@pytest.fixture(scope="module")
def base(default_gguf_path):
    return LLM(default_gguf_path, dtype="float32", dequantize=True)


@pytest.fixture(scope="module")
def text() -> str:
    return evaluation_text(quiet=True)[:20_000]


@pytest.fixture(scope="module")
def c4_ids(base) -> list[int]:
    return base.tokenizer.encode(calibration_text(quiet=True))


@pytest.fixture(scope="module")
def calibration_ids(c4_ids) -> list[list[int]]:
    """Evenly spread windows of c4 before the held-out tail."""
    usable = len(c4_ids) - HELD_OUT - LENGTH
    return [c4_ids[start : start + LENGTH] for start in range(0, usable, usable // SAMPLES)][:SAMPLES]


@pytest.fixture(scope="module")
def layer_io(base, c4_ids):
    """Each float layer's input and its output change (layer(x) - x) on 4 x 256 held-out c4 tokens, with the context
    to run them. The calibrated methods fit the calibration text's distribution; this measures that fit on new text,
    while the KL on wiki measures how it carries over to another corpus."""
    ids = torch.tensor(c4_ids[-HELD_OUT:][: 4 * 256]).view(4, 256)
    model = base.model
    with torch.inference_mode():
        hidden = model.embed_tokens(ids)
        ctx = model.forward_context(torch.arange(ids.shape[1]).expand_as(ids), hidden.dtype)
        io = []
        for layer in model.layers:
            out = layer(hidden, ctx)
            io.append((hidden, out - hidden))
            hidden = out
    return io, ctx


@pytest.fixture(scope="module")
def results(default_gguf_path, base, text, calibration_ids, layer_io):
    """{method: (mean relative layer error, KL nats/token, seconds)} for each of METHODS."""
    io, ctx = layer_io
    table = {}
    for method in METHODS:
        llm = LLM(default_gguf_path, dtype="float32", dequantize=True)
        config = QuantConfig(
            method.removesuffix("-act-order"),
            bits=BITS,
            group_size=GROUP,
            calibration_samples=SAMPLES,
            calibration_length=LENGTH,
            act_order=method.endswith("act-order"),
        )
        started = time.perf_counter()
        quantize(llm, config, calibration_ids)
        seconds = time.perf_counter() - started
        use_reference_kernels(llm.model)
        with torch.inference_mode():
            errors = [
                ((layer(x, ctx) - x - change).norm() / change.norm()).item()
                for layer, (x, change) in zip(llm.model.layers, io, strict=True)
            ]
        kl = evaluate(llm, text, corpus="wiki", context=512, stride=256, max_tokens=EVAL_TOKENS, baseline=base).kl_mean
        table[method] = (sum(errors) / len(errors), kl, seconds)
        print(f"{method}: layer error {table[method][0]:.4f}, KL {kl:.5f}, {seconds:.1f} s", file=sys.stderr)
        print(" ".join(f"{e:.3f}" for e in errors), file=sys.stderr)
    return table


def use_reference_kernels(model: torch.nn.Module) -> None:
    """Dequantize-then-matmul: the definition, and much faster here than torch's int4 kernel with float32 inputs."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.kernel = "reference"


@pytest.mark.parametrize("method", METHODS[1:])
def test_calibrated_method_beats_round_to_nearest(results, method):
    layer_error, kl, _ = results[method]
    rtn_layer_error, rtn_kl, _ = results["int4"]
    assert layer_error < rtn_layer_error, (method, layer_error, rtn_layer_error)
    assert kl < rtn_kl, (method, kl, rtn_kl)

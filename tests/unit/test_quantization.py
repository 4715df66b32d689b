"""Quantization primitives: round-to-nearest error bounds, kernels vs the dequantize-then-matmul reference,
packing, and GGUF blocks read without loss."""

import gguf
import numpy as np
import pytest
import torch

from leanlm.compress.config import QuantConfig
from leanlm.compress.rtn import quantize_rtn
from leanlm.errors import InvalidRequestError
from leanlm.formats.gguf_blocks import blocks_to_quantized
from leanlm.formats.quantized_folder import pack_codes, unpack_codes
from leanlm.layers.quantized_linear import QuantizedLinear


def random_weight(rows=96, cols=256, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("bits,group,symmetric", [(8, -1, True), (4, 32, False), (4, 128, False), (3, 64, False)])
def test_rtn_round_trip_error_is_at_most_half_a_step(bits, group, symmetric):
    w = random_weight()
    q = quantize_rtn(w, bits, group, symmetric)
    step = q.scale.repeat_interleave(q.group_size, dim=1)
    assert (q.dequantize() - w).abs().le(step / 2 + 1e-7).all()
    if symmetric:
        assert q.codes.dtype == torch.int8 and q.codes.abs().max() <= 2 ** (bits - 1) - 1 and q.offset is None
    else:
        assert q.codes.dtype == torch.uint8 and q.codes.max() <= 2**bits - 1
    fewer_bits = quantize_rtn(w, bits - 1, group, symmetric)
    assert (fewer_bits.dequantize() - w).norm() > (q.dequantize() - w).norm()


def test_group_that_does_not_divide_the_width_leaves_a_short_last_group():
    w = random_weight(cols=576)  # SmolLM2's width: 4 groups of 128 and one of 64
    q = quantize_rtn(w, 4, 128, False)
    assert q.scale.shape == (96, 5)
    step = q.per_column(q.scale)
    assert step.shape == w.shape and (q.dequantize() - w).abs().le(step / 2 + 1e-7).all()
    # the short group has its own range: its scale comes from columns 512..575 only
    tail = w[:, 512:]
    torch.testing.assert_close(q.scale[:, 4], (tail.amax(-1) - tail.amin(-1)) / 15)
    with pytest.raises(InvalidRequestError, match="multiple of 8"):
        quantize_rtn(w, 4, 12, False)


def test_int4_kernel_takes_groups_it_cannot_divide_by_smaller_equal_groups():
    layer = QuantizedLinear(quantize_rtn(random_weight(cols=576), 4, 128, False))
    assert layer.prepare_runtime(torch.bfloat16, torch.device("cpu"), "torch") == "int4pack"
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(2))
    expected = layer.reference_forward(x)
    assert ((layer(x.bfloat16()).float() - expected).abs().max() / expected.abs().max()) < 3e-2


@pytest.mark.parametrize(
    "bits,group,symmetric,torch_kernel,leanlm_kernel",
    [
        (4, 32, False, "int4pack", "leanlm-q4"),
        (4, 128, False, "int4pack", "leanlm-q4"),
        (8, -1, True, "int8pack", "leanlm-q8"),
        (8, 32, True, "dense", "leanlm-q8"),
        (3, 64, False, "int4pack", "leanlm-q4"),
    ],
)
@pytest.mark.parametrize("mode", ["torch", "exact"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_kernels_match_reference(bits, group, symmetric, torch_kernel, leanlm_kernel, mode, dtype, tolerance):
    """torch's kernels (the fallback) and leanlm's own with float activations; tests/unit/test_kernels.py
    covers int8 activations and odd shapes."""
    from leanlm.kernels.build import load_kernels

    if mode == "exact" and not load_kernels():
        pytest.skip("leanlm kernels unavailable")
    layer = QuantizedLinear(quantize_rtn(random_weight(), bits, group, symmetric), torch.randn(96) * 0.1)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = layer.reference_forward(x.float())
    kernel = torch_kernel if mode == "torch" else leanlm_kernel
    assert layer.prepare_runtime(dtype, torch.device("cpu"), mode) == kernel
    got = layer(x).float()
    scale = expected.abs().max()
    assert ((got - expected).abs().max() / scale) < tolerance


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = pack_codes(codes, 4)
    assert packed.shape == (7, 32) and torch.equal(unpack_codes(packed, 4), codes)
    int8 = torch.randint(-127, 128, (3, 8), dtype=torch.int8)
    assert torch.equal(unpack_codes(pack_codes(int8, 8), 8), int8)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_are_lossless(type_name):
    """Our codes/scale/offset dequantize to exactly what the gguf package dequantizes the blocks to."""
    weight = random_weight(64, 256).numpy()
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(weight, qtype)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
    quantized = blocks_to_quantized(raw, type_name, (64, 256))
    assert torch.equal(quantized.dequantize(), expected.reshape(64, 256))
    assert quantized.group_size == 32 and quantized.bits == (8 if type_name == "Q8_0" else 4)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="int3"), "Unknown quantization method"),
        (dict(method="int8", bits=4), "8 bits"),
        (dict(method="int4", bits=9), "between 2 and 8"),
        (dict(method="gptq", group_size=12), "multiple of 8"),
        (dict(method="gptq", damp=2.0), "damp"),
    ],
)
def test_invalid_quant_config(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        QuantConfig(**kwargs)


def test_quant_config_defaults():
    assert (QuantConfig("int8").bits, QuantConfig("int8").group_size) == (8, -1)
    assert (QuantConfig("awq").bits, QuantConfig("awq").group_size) == (4, 128)

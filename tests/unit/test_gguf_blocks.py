"""Every GGUF block type a model may carry loads exactly as the `gguf` package dequantizes it.

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K load natively (codes, scales and offsets as stored:
blocks_to_quantized); every other type is dequantized at load (GGUFFile.load_tensor). The tensors are written
into a real GGUF file: quantized by `gguf.quants.quantize` where the package can (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
F16, BF16), and as random blocks with sane float16 scales where it cannot (the K-quants), which exercises every
bit of their codes and scales.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

from leanlm.formats.gguf import GGUFFile
from leanlm.formats.gguf_blocks import NATIVE_TYPES, blocks_to_quantized
from leanlm.kernels.layout import kernel_format
from leanlm.layers.quantized_tensor import QuantizedTensor

QUANTIZED_BY_GGUF = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16"]
# Byte offsets of each K-quant block's float16 scales (d, and dmin where the type has one); the rest of a block
# is codes and packed sub-block scales, where any byte is valid.
K_QUANT_FLOAT16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
ROWS, COLUMNS = 7, 512  # an odd number of rows; two K-quant super-blocks (256) per row


def random_blocks(type_name: str, rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    blocks = rng.integers(0, 256, (rows, columns // block_size, type_size), dtype=np.uint8)
    for offset in K_QUANT_FLOAT16_FIELDS[type_name]:
        scales = (rng.standard_normal((rows, columns // block_size)) * 0.01).astype(np.float16)
        blocks[..., offset : offset + 2] = scales.view(np.uint8).reshape(rows, -1, 2)
    return blocks.reshape(rows, -1)


@pytest.fixture(scope="module")
def gguf_with_every_type(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "blocks.gguf"
    writer = GGUFWriter(str(path), "llama")
    stored = {}
    for type_name in QUANTIZED_BY_GGUF + list(K_QUANT_FLOAT16_FIELDS):
        quant_type = GGMLQuantizationType[type_name]
        if type_name in QUANTIZED_BY_GGUF:
            raw = quantize((rng.standard_normal((ROWS, COLUMNS)) * 0.05).astype(np.float32), quant_type)
        else:
            raw = random_blocks(type_name, ROWS, COLUMNS, rng)
        writer.add_tensor(f"t.{type_name}", raw, raw_shape=raw.shape, raw_dtype=quant_type)
        stored[type_name] = raw
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(path), stored


def reference(raw: np.ndarray, type_name: str) -> torch.Tensor:
    return torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).astype(np.float32))


@pytest.mark.parametrize("type_name", QUANTIZED_BY_GGUF + list(K_QUANT_FLOAT16_FIELDS))
def test_dequantized_load_equals_gguf(gguf_with_every_type, type_name):
    gguf_file, stored = gguf_with_every_type
    assert gguf_file.tensor_type_name(f"t.{type_name}") == type_name
    written = stored[type_name].view(np.uint8).reshape(ROWS, -1)  # F16 and BF16 come back as 16-bit arrays
    assert np.array_equal(gguf_file.raw_tensor(f"t.{type_name}"), written)
    loaded = gguf_file.load_tensor(f"t.{type_name}", torch.float32)
    expected = reference(stored[type_name], type_name)
    assert loaded.shape == (ROWS, COLUMNS) and expected.isfinite().all()
    assert torch.equal(loaded, expected)


@pytest.mark.parametrize("type_name", NATIVE_TYPES)
def test_native_blocks_load_bit_exactly(gguf_with_every_type, type_name):
    """The codes and scales as stored: W = codes * scale + offset, computed exactly (float64), rounds to what
    the `gguf` package computes in float32."""
    gguf_file, stored = gguf_with_every_type
    weight = blocks_to_quantized(gguf_file.raw_tensor(f"t.{type_name}"), type_name, (ROWS, COLUMNS))
    bits = {"Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6}.get(type_name, 4)
    assert weight.bits == bits and weight.group_size == (16 if type_name == "Q6_K" else 32)
    assert weight.codes.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert kernel_format(weight) == ("q4" if bits == 4 else "q8")  # every native type runs leanlm's kernels
    exact = weight.codes.double() * weight.per_column(weight.scale).double()
    if weight.offset is not None:
        exact += weight.per_column(weight.offset).double()
    assert torch.equal(exact.float(), reference(stored[type_name], type_name))
    assert torch.equal(weight.dequantize(), reference(stored[type_name], type_name))


def test_other_types_are_not_taken_as_native():
    with pytest.raises(ValueError, match="Q3_K is not a native block type"):
        blocks_to_quantized(np.zeros((1, 110), np.uint8), "Q3_K", (1, 256))


def test_mixed_block_types_stack_exactly(gguf_with_every_type):
    """A Q4_K_M file's fused projections: Q4_K beside Q6_K, Q5_0 beside Q8_0, stacked in one common form."""
    gguf_file, _ = gguf_with_every_type
    for mix, kind in ((("Q4_K", "Q6_K", "Q4_K"), "q8"), (("Q5_0", "Q8_0"), "q8"), (("Q4_0", "Q4_K", "Q4_1"), "q4")):
        parts = [blocks_to_quantized(gguf_file.raw_tensor(f"t.{t}"), t, (ROWS, COLUMNS)) for t in mix]
        fused = QuantizedTensor.cat(parts)
        assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
        assert kernel_format(fused) == kind


@pytest.mark.parametrize("type_name", NATIVE_TYPES)
def test_kernel_layouts_hold_native_blocks_at_their_bits(gguf_with_every_type, type_name, monkeypatch):
    """Q5_0/Q5_1/Q5_K codes are packed 5 bits a code and Q6_K 6 (not a byte each): the layout gives back gguf's
    values exactly, and the kernels the same output bits as from the 8-bit layout (int8 and float activations)."""
    from leanlm.kernels import build, layout

    if not build.load_kernels():
        pytest.skip("leanlm kernels unavailable (no compiler or AVX2)")
    gguf_file, stored = gguf_with_every_type
    weight = blocks_to_quantized(gguf_file.raw_tensor(f"t.{type_name}"), type_name, (ROWS, COLUMNS))
    packed = layout.pack(weight)
    bits = {"Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6}.get(type_name, 4)
    assert packed.code_bits == bits
    dense = torch.ops.leanlm.dequantize(*packed.tensors()[:3], packed.rows, *packed.tensors()[3:])
    assert torch.equal(dense, reference(stored[type_name], type_name))
    if bits in (5, 6):
        monkeypatch.setattr(layout, "packed_bits", lambda _: None)
        wide = layout.pack(weight)
        x = torch.randn(3, COLUMNS, generator=torch.Generator().manual_seed(0))
        for int8_activations in (True, False):
            outputs = [
                torch.ops.leanlm.q8_linear(x, *p.tensors()[:3], None, p.rows, int8_activations, *p.tensors()[3:])
                for p in (packed, wide)
            ]
            assert torch.equal(*outputs)


def test_a_q4_k_beside_a_q6_k_packs_at_6_bits(gguf_with_every_type):
    """A Q4_K_M file's q/k (Q4_K) fused with a Q6_K v: their common form holds 6 bits a code, not 8."""
    from leanlm.kernels import layout

    gguf_file, _ = gguf_with_every_type
    parts = [blocks_to_quantized(gguf_file.raw_tensor(f"t.{t}"), t, (ROWS, COLUMNS)) for t in ("Q4_K", "Q6_K")]
    assert layout.packed_bits(QuantizedTensor.cat(parts)) == (6, 32)

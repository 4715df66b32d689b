"""The default model re-encoded by llama.cpp's own quantizer (K-quant mixes, Q5_0/Q5_1, BF16) loads exactly as
the `gguf` package dequantizes it, tensor by tensor, and as a model. Needs llama-cpp-python (the `bench` extra,
which `make test` installs); the files are made once from an F16 export and cached under $LEANLM_HOME/exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from leanlm.formats.gguf import GGUFFile
from leanlm.formats.gguf_blocks import NATIVE_TYPES, blocks_to_quantized

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp")

FILE_TYPES = ["Q4_K_M", "Q5_K_M", "Q3_K_M", "BF16"]  # between them: every block type llama.cpp writes here


@pytest.fixture(scope="module")
def re_encoded(default_gguf_path) -> dict:
    from leanlm.bench.llama_cpp_files import quantize_with_llama_cpp
    from leanlm.cli.bench import gguf_for_llama_cpp

    f16 = gguf_for_llama_cpp(str(default_gguf_path), "F16")
    return {
        t: quantize_with_llama_cpp(f16, t, f16.with_name(f"{default_gguf_path.stem}.llama-{t}.gguf"))
        for t in FILE_TYPES
    }


def test_the_files_hold_every_block_type(re_encoded):
    files = [GGUFFile(path) for path in re_encoded.values()]
    types = {gguf_file.tensor_type_name(name) for gguf_file in files for name in gguf_file.tensors}
    # Q2_K/Q3_K never appear: llama.cpp uses them only on 576-wide rows here, which fall back (576 % 256 != 0).
    # tests/unit/test_gguf_blocks.py covers them on random blocks.
    assert types >= {"Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0", "BF16", "F32"}, types


@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_every_tensor_loads_as_gguf_dequantizes_it(re_encoded, file_type):
    gguf_file = GGUFFile(re_encoded[file_type])
    for name, info in gguf_file.tensors.items():
        type_name = gguf_file.tensor_type_name(name)
        raw = gguf_file.raw_tensor(name)
        expected = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).astype(np.float32))
        assert torch.equal(gguf_file.load_tensor(name, torch.float32), expected.reshape(info.shape)), name
        if type_name in NATIVE_TYPES and len(info.shape) == 2:
            assert torch.equal(blocks_to_quantized(raw, type_name, info.shape).dequantize(), expected), name


def test_a_k_quant_mix_loads_as_a_model(re_encoded):
    from leanlm.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(re_encoded["Q4_K_M"], torch.float32)
    assert len(set(checkpoint.weight_types.values())) >= 3  # a per-tensor mix, as llama.cpp writes it
    assert all(t.isfinite().all() for t in checkpoint.weights.values() if isinstance(t, torch.Tensor))

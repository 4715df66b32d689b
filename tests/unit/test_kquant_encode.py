"""Q4_K/Q6_K encoders (GGUF export): the bytes decode, by leanlm's decoder and by the gguf package's, to the values
the encoder rounded to, within the block format's own error."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from leanlm.compress.kquant_encode import encode_q4_k, encode_q6_k
from leanlm.compress.rtn import quantize_rtn
from leanlm.formats.gguf_blocks import blocks_to_quantized

ROWS, COLS = 16, 768


def weights(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(ROWS, COLS, generator=g) * 0.05
    w[3] = w[3].abs()  # a row with no negative weight: the sub-block minimum clamps to 0
    w[5, :256] = 0.0  # an all-zero super-block
    return w


# type -> (encoder, bytes per super-block, relative error bound, RTN bits of the same size class)
CASES = {"Q4_K": (encode_q4_k, 144, 0.09, 4), "Q6_K": (encode_q6_k, 210, 0.025, 6)}


@pytest.mark.parametrize("type_name", CASES)
def test_encoded_blocks_decode_the_same_in_leanlm_and_gguf(type_name):
    encode, block_bytes, bound, bits = CASES[type_name]
    w = weights()
    raw = encode(w)
    assert raw.shape == (ROWS, COLS // 256 * block_bytes) and raw.dtype == np.uint8
    ours = blocks_to_quantized(raw, type_name, (ROWS, COLS)).dequantize()
    theirs = torch.from_numpy(dequantize(raw, getattr(GGMLQuantizationType, type_name)).astype(np.float32))
    assert torch.equal(ours, theirs.reshape(ROWS, COLS))
    error = ((ours - w).norm() / w.norm()).item()
    rtn = quantize_rtn(w, bits, 32 if bits == 4 else 16, symmetric=bits == 6).dequantize()
    # the block's error is that of round-to-nearest at the same bits, up to its 6/8-bit sub-block scales
    assert error < bound and error < 1.3 * ((rtn - w).norm() / w.norm()).item(), error
    assert torch.equal(ours[5, :256], torch.zeros(256))


def test_q4_k_keeps_values_already_on_a_q4_k_grid():
    """Re-encoding a decoded Q4_K matrix gives the same values: a GPTQ/AWQ result on that grid survives."""
    once = blocks_to_quantized(encode_q4_k(weights(1)), "Q4_K", (ROWS, COLS)).dequantize()
    twice = blocks_to_quantized(encode_q4_k(once), "Q4_K", (ROWS, COLS)).dequantize()
    assert (twice - once).abs().max() < 1e-3 * once.abs().max()

"""leanlm's C++ kernels against their plain torch references, on random shapes.

Tolerances (relative Frobenius error of the output against float64 dequantize-then-matmul):
  float activations ("exact" mode): 1e-5, float32 rounding only
  int8 activations ("auto" mode): 2e-2; each activation block is rounded to max|x|/127 steps, so the error of a
  dot product is at most 1/254 of sum |w| * max|x| per block; on random data it lands near 5e-3.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from leanlm.kernels import build, layout
from leanlm.kernels.layout import KernelWeight, kernel_format, pack, unpack
from leanlm.layers import quantized_linear
from leanlm.layers.quantized_linear import QuantizedLinear, QuantizedTensor

pytestmark = pytest.mark.skipif(not build.load_kernels(), reason="leanlm kernels unavailable (no compiler or AVX2)")

EXACT_TOLERANCE = 1e-5
INT8_ACTIVATION_TOLERANCE = 2e-2


# q4: unsigned 4-bit codes with offsets (Q4_0/Q4_1/Q4_K); q8: int8 codes (Q8_0, leanlm's int8); q8-offset: 5-bit
# codes with offsets (Q5_1/Q5_K); q8-sub16: 6-bit codes with a scale per 16 inputs (Q6_K), the group argument
# ignored; q8-sub16-offset: a Q4_K beside a Q6_K in their common form (scales per 16, offsets per 32).
KINDS = ["q4", "q8", "q8-offset", "q8-sub16", "q8-sub16-offset"]


def random_weight(rows: int, columns: int, kind: str, group: int, seed: int) -> QuantizedTensor:
    generator = torch.Generator().manual_seed(seed)
    group = 16 if "sub16" in kind else group
    groups = -(-columns // group)
    # float16-representable scales, as every stored checkpoint has (GGUF blocks, leanlm artifacts)
    scale = (torch.rand(rows, groups, generator=generator) * 0.02 + 1e-3).half().float()
    offset = (torch.randn(rows, groups, generator=generator) * 0.05).half().float()
    if kind == "q4":
        codes = torch.randint(0, 16, (rows, columns), dtype=torch.uint8, generator=generator)
        return QuantizedTensor(codes, scale, offset, 4, group)
    if kind == "q8":
        codes = torch.randint(-127, 128, (rows, columns), dtype=torch.int8, generator=generator)
        return QuantizedTensor(codes, scale, None, 8, group)
    low, high = (0, 32) if kind == "q8-offset" else (-32, 32)
    codes = torch.randint(low, high, (rows, columns), dtype=torch.int8, generator=generator)
    if kind == "q8-sub16-offset":
        offset = offset[:, 0::2].repeat_interleave(2, dim=1)[:, :groups]  # one offset per block of 32
    return QuantizedTensor(codes, scale, offset if kind.endswith("offset") else None, 6, group)


def run_kernel(weight: QuantizedTensor | KernelWeight, x: torch.Tensor, int8_activations: bool):
    p = weight if isinstance(weight, KernelWeight) else pack(weight)
    if p.q4:
        return torch.ops.leanlm.q4_linear(x, p.codes, p.scales, p.offsets, None, p.rows, int8_activations)
    return torch.ops.leanlm.q8_linear(x, p.codes, p.scales, p.offsets, None, p.rows, int8_activations)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference).norm() / reference.norm())


# rows not a multiple of 8 (the interleave), batches not a multiple of 4 (the batch tile), widths of 1..48
# blocks, group sizes of 32, 64 and 128 (128 over 576 inputs leaves a short last group).
SHAPES = [(1, 1, 32, 32), (5, 3, 96, 32), (13, 4, 64, 64), (577, 1, 576, 128), (64, 9, 1536, 32), (200, 6, 160, 32)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows,batch,columns,group", SHAPES)
def test_matvec_kernels_match_reference(kind, rows, batch, columns, group):
    weight = random_weight(rows, columns, kind, group, seed=rows * batch + columns)
    x = torch.randn(batch, columns, generator=torch.Generator().manual_seed(batch))
    reference = x.double() @ weight.dequantize().double().t()
    assert relative_error(run_kernel(weight, x, int8_activations=False), reference) < EXACT_TOLERANCE
    assert relative_error(run_kernel(weight, x, int8_activations=True), reference) < INT8_ACTIVATION_TOLERANCE


# Packed 5- and 6-bit codes (Q5_0: signed, Q5_1/Q5_K: unsigned with offsets, Q6_K: signed per 16) against the same
# weight held in the 8-bit layout: packing changes the storage only, so the outputs must be the same bits.
PACKED = [(6, True, 16), (6, False, 32), (5, True, 32), (5, False, 32), (5, True, 16), (6, True, 32)]


def packed_weight(rows: int, columns: int, bits: int, signed: bool, group: int, seed: int) -> QuantizedTensor:
    generator = torch.Generator().manual_seed(seed)
    low, high = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    codes = torch.randint(low, high, (rows, columns), dtype=torch.int8, generator=generator)
    scale = (torch.rand(rows, columns // group, generator=generator) * 0.02 + 1e-3).half().float()
    offset = (torch.randn(rows, columns // 32, generator=generator) * 0.05).half().float()
    offset = None if signed else offset.repeat_interleave(32 // group, dim=1)
    return QuantizedTensor(codes, scale, offset, bits, group)


@pytest.mark.parametrize("bits,signed,group", PACKED)
@pytest.mark.parametrize("rows,batch,columns", [(13, 1, 64), (70, 3, 96), (577, 9, 576), (64, 5, 1536)])
def test_packed_codes_give_the_8_bit_layouts_bits(bits, signed, group, rows, batch, columns, monkeypatch):
    weight = packed_weight(rows, columns, bits, signed, group, seed=rows + bits)
    packed = pack(weight)
    monkeypatch.setattr(layout, "packed_bits", lambda _: None)
    wide = pack(weight)
    assert packed.code_bits == bits and wide.code_bits == 8
    assert packed.codes.numel() * 8 == wide.codes.numel() * bits  # bits per code, exactly
    assert torch.equal(unpack(packed, bits, group).codes, weight.codes)
    x = torch.randn(batch, columns, generator=torch.Generator().manual_seed(batch))
    for int8_activations in (True, False):
        ours, theirs = run_kernel(packed, x, int8_activations), run_kernel(wide, x, int8_activations)
        assert torch.equal(ours, theirs), int8_activations
        for i in (0, batch - 1):  # a row alone gives its bits in the batch
            assert torch.equal(run_kernel(packed, x[i : i + 1], int8_activations)[0], ours[i])
    dense = torch.ops.leanlm.dequantize(packed.codes, packed.scales, packed.offsets, packed.rows)
    assert torch.equal(dense, weight.dequantize())


def test_codes_wider_than_their_bits_stay_8_bit():
    weight = packed_weight(16, 64, 6, True, 32, seed=1)
    weight.codes[3, 5] = -33  # outside 6-bit two's complement, and negative: no 6-bit form
    assert pack(weight).code_bits == 8
    weight.codes[3, 5] = 63  # 0..63 with a negative elsewhere: no 6-bit form either
    assert pack(weight).code_bits == 8
    assert pack(packed_weight(16, 64, 8, True, 32, seed=1)).code_bits == 8  # declared 8-bit codes stay 8-bit


def k_quant_weight(rows: int, columns: int, kind: str, seed: int) -> QuantizedTensor:
    """GGUF K-quant form: parameters = int8 multiplier * float16 base per 256 inputs (Q4_K: per-32 scales 0..63
    and offsets, Q6_K: per-16 scales -128..127, no offset)."""
    generator = torch.Generator().manual_seed(seed)
    supers = columns // 256

    def base(sign: float = 1.0) -> torch.Tensor:
        return (sign * (torch.rand(rows, supers, generator=generator) * 1e-3 + 1e-4)).half().float()

    if kind == "q4-k":
        codes = torch.randint(0, 16, (rows, columns), dtype=torch.uint8, generator=generator)
        scale_base, offset_base = base(), base(-1.0)
        multipliers = [torch.randint(0, 64, (rows, columns // 32), generator=generator).float() for _ in range(2)]
        scale, offset = (
            b.repeat_interleave(8, dim=1) * m for b, m in zip((scale_base, offset_base), multipliers, strict=True)
        )
        return QuantizedTensor(codes, scale, offset, 4, 32, scale_base, offset_base)
    codes = torch.randint(-32, 32, (rows, columns), dtype=torch.int8, generator=generator)
    scale_base = base()
    scale = scale_base.repeat_interleave(16, dim=1) * torch.randint(
        -128, 128, (rows, columns // 16), generator=generator
    )
    return QuantizedTensor(codes, scale, None, 6, 16, scale_base)


def run_packed(p, x: torch.Tensor, int8_activations: bool) -> torch.Tensor:
    op = torch.ops.leanlm.q4_linear if p.q4 else torch.ops.leanlm.q8_linear
    return op(x, p.codes, p.scales, p.offsets, None, p.rows, int8_activations, p.scale_base, p.offset_base)


@pytest.mark.parametrize("kind", ["q4-k", "q8-sub16-k"])
@pytest.mark.parametrize("rows,batch,columns", [(13, 1, 256), (70, 3, 512), (200, 4, 768), (577, 9, 1536)])
def test_k_quant_parameters_give_the_float_parameters_bits(kind, rows, batch, columns):
    """int8 multipliers of float16 bases (4.6 bits a Q4_K weight) compute base * multiplier exactly in float32, so
    every kernel gives the same bits as with float32 parameters; both match the reference."""
    weight = k_quant_weight(rows, columns, kind, seed=rows + columns)
    compact = pack(weight)
    assert compact.scales.dtype == torch.int8 and compact.scale_base.dtype == torch.float16
    plain = pack(QuantizedTensor(weight.codes, weight.scale, weight.offset, weight.bits, weight.group_size))
    assert plain.scale_base is None and compact.nbytes() < plain.nbytes()
    x = torch.randn(batch, columns, generator=torch.Generator().manual_seed(batch))
    reference = x.double() @ weight.dequantize().double().t()
    for int8_activations in (True, False):
        out = run_packed(compact, x, int8_activations)
        assert torch.equal(out, run_packed(plain, x, int8_activations))
        tolerance = INT8_ACTIVATION_TOLERANCE if int8_activations else EXACT_TOLERANCE
        assert relative_error(out, reference) < tolerance
        assert torch.equal(run_packed(compact, x[-1:], int8_activations)[0], out[-1])  # batch invariance
    dense = torch.ops.leanlm.dequantize(*compact.tensors()[:3], compact.rows, *compact.tensors()[3:])
    assert torch.equal(dense, weight.dequantize())


def test_a_fused_projection_of_mixed_types_packs_as_narrow_row_segments(monkeypatch):
    """A Q4_K_M file's q/k (Q4_K) fused with a Q6_K v: q/k packed as q4 (their scales per 16, as in the common
    form) and v as 6-bit, not both in the 6-bit common form; the layer gives the bits of the common form's single
    layout, batch by batch, and holds the fused weight exactly."""
    parts = [k_quant_weight(24, 512, "q4-k", seed=1), k_quant_weight(16, 512, "q4-k", seed=2)]
    parts.append(k_quant_weight(13, 512, "q8-sub16-k", seed=3))  # the last segment may end mid row group
    fused = QuantizedTensor.cat(parts)
    packed = layout.pack_segments(fused)
    assert [(s.rows, s.code_bits) for s in packed.segments()] == [(40, 4), (13, 6)]
    assert packed.nbytes() < 0.8 * pack(fused).nbytes()
    layer, single = QuantizedLinear(fused, bias=torch.randn(53)), QuantizedLinear(fused, bias=torch.randn(53))
    single.bias = layer.bias
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(0))
    for mode in ("auto", "exact"):
        layer.prepare_runtime(torch.float32, torch.device("cpu"), mode)
        with monkeypatch.context() as patch:
            patch.setattr(quantized_linear, "pack_segments", layout.pack)
            single.prepare_runtime(torch.float32, torch.device("cpu"), mode)
        assert layer.runtime_bytes() == packed.nbytes() and single._packed.rest is None
        assert torch.equal(layer(x), single(x))
        assert torch.equal(layer(x[2:3])[0], layer(x)[2])
    for name in ("codes", "scale", "offset", "scale_base", "offset_base"):
        original, restored = getattr(fused, name), getattr(layer, name)
        assert torch.equal(original, restored) and original.dtype == restored.dtype


def test_parameters_that_are_not_multiples_of_their_base_stay_float():
    weight = k_quant_weight(16, 256, "q4-k", seed=0)
    weight.scale[3, 2] += 1e-7  # no longer an integer times its base
    assert pack(weight).scale_base is None and pack(weight).scales.dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("int8_activations", [False, True])
def test_a_rows_result_does_not_depend_on_the_batch(kind, int8_activations):
    """Bit for bit: the engine's greedy outputs must be the same alone and batched (prefill, decode, mixed)."""
    weight = random_weight(70, 96, kind, 32, seed=3)
    x = torch.randn(2, 31, 96, generator=torch.Generator().manual_seed(8))  # 62 rows: 15 tiles of 4 and 2 single
    batched = run_kernel(weight, x, int8_activations)
    assert batched.shape == (2, 31, 70) and batched.dtype == torch.float32
    rows = x.reshape(-1, 96)
    for i in (0, 5, 30, 61):
        assert torch.equal(run_kernel(weight, rows[i : i + 1], int8_activations)[0], batched.reshape(-1, 70)[i])
    assert torch.equal(run_kernel(weight, rows[:3], int8_activations), batched.reshape(-1, 70)[:3])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("float16_params", [True, False])
def test_dequantize_is_exact(kind, float16_params):
    weight = random_weight(21, 128, kind, 64, seed=5)
    if not float16_params:  # float32 scales, as leanlm's own quantizers make them
        weight.scale += 1e-6
    p = pack(weight)
    dense = torch.ops.leanlm.dequantize(p.codes, p.scales, p.offsets, p.rows)
    torch.testing.assert_close(dense, weight.dequantize(), rtol=0, atol=0)


def test_bfloat16_activations_come_back_as_bfloat16():
    weight = random_weight(16, 64, "q4", 32, seed=7)
    x = torch.randn(1, 64).bfloat16()
    out = run_kernel(weight, x, int8_activations=False)
    assert out.dtype == torch.bfloat16
    reference = x.double() @ weight.dequantize().double().t()
    assert relative_error(out, reference) < 1e-2  # the output's own bfloat16 rounding


@pytest.mark.parametrize("mode,kernel", [("auto", "leanlm-q4"), ("exact", "leanlm-q4"), ("torch", "int4pack")])
def test_quantized_linear_modes_match_reference_forward(mode, kernel):
    layer = QuantizedLinear(random_weight(48, 128, "q4", 32, seed=11), bias=torch.randn(48))
    assert layer.prepare_runtime(torch.float32, torch.device("cpu"), mode) == kernel
    x = torch.randn(3, 128)
    tolerance = INT8_ACTIVATION_TOLERANCE if mode == "auto" else EXACT_TOLERANCE
    assert relative_error(layer(x), layer.reference_forward(x).double()) < tolerance


def test_layouts_the_kernels_cannot_read_keep_the_torch_path():
    odd_width = random_weight(8, 48, "q8", 48, seed=1)  # 48 inputs: not a whole number of 32-blocks
    assert kernel_format(odd_width) is None
    sub16 = random_weight(8, 64, "q8-sub16-offset", 16, seed=1)
    sub16.offset[:, 1] += 1  # offsets per 16: the kernels hold one per block of 32
    assert kernel_format(sub16) is None
    layer = QuantizedLinear(odd_width)
    assert layer.prepare_runtime(torch.float32, torch.device("cpu"), "auto") == "int8pack"  # torch's per-row kernel
    with pytest.raises(ValueError, match="kernel mode"):
        layer.prepare_runtime(torch.float32, torch.device("cpu"), "fastest")


def test_fused_ops_match_torch():
    x = torch.randn(3, 7, 576) * 4
    weight = torch.rand(576) + 0.5
    torch.testing.assert_close(
        torch.ops.leanlm.rms_norm(x, weight, 1e-5), torch.nn.functional.rms_norm(x, (576,), weight, 1e-5)
    )
    gate_up = torch.randn(2, 5, 2 * 96) * 3
    gate, up = gate_up.split(96, dim=-1)
    torch.testing.assert_close(torch.ops.leanlm.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)


def test_ops_pass_torch_library_checks():
    """Schema, fake (shape-only) implementations for torch.compile, and eager results agree."""
    p = pack(random_weight(24, 64, "q4", 32, seed=2))
    torch.library.opcheck(
        torch.ops.leanlm.q4_linear.default, (torch.randn(2, 64), p.codes, p.scales, p.offsets, None, p.rows, True)
    )
    p = pack(random_weight(24, 64, "q8-sub16-offset", 16, seed=2))
    assert p.scales.shape == (3, 2, 16) and p.offsets.shape == (3, 2, 8)
    torch.library.opcheck(
        torch.ops.leanlm.q8_linear.default, (torch.randn(2, 64), p.codes, p.scales, p.offsets, None, p.rows, True)
    )
    torch.library.opcheck(torch.ops.leanlm.silu_mul.default, (torch.randn(3, 8),))
    half = (torch.randn(2, 40), torch.randn(5, 40).bfloat16(), None)
    torch.library.opcheck(torch.ops.leanlm.half_linear.default, half)


def test_failed_build_falls_back_with_one_warning(monkeypatch, tmp_path):
    import torch.utils.cpp_extension

    monkeypatch.setenv("LEANLM_HOME", str(tmp_path))  # no cached build: the compiler is asked

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++ not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    build.load_kernels.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert build.load_kernels() is False
        assert len(caught) == 1 and "using torch's kernels" in str(caught[0].message)
    finally:
        build.load_kernels.cache_clear()
        monkeypatch.undo()
        assert build.load_kernels()  # the real build again, from the cache


def test_disable_variable_forces_the_fallback(monkeypatch):
    monkeypatch.setenv(build.DISABLE_ENV, "1")
    build.load_kernels.cache_clear()
    try:
        assert build.load_kernels() is False
        layer = QuantizedLinear(random_weight(16, 64, "q4", 32, seed=4))
        assert layer.prepare_runtime(torch.float32, torch.device("cpu"), "auto") == "int4pack"
    finally:
        monkeypatch.delenv(build.DISABLE_ENV)
        build.load_kernels.cache_clear()


def test_rotary_matches_reference():
    from leanlm.layers.rope import apply_rotary

    generator = torch.Generator().manual_seed(9)
    qkv = torch.randn(2, 5, 15, 64, generator=generator).transpose(1, 2)  # (B, heads, T, D), strided like the model
    cos, sin = torch.randn(2, 1, 5, 64, generator=generator), torch.randn(2, 1, 5, 64, generator=generator)
    torch.testing.assert_close(torch.ops.leanlm.rotary(qkv[:, :12], cos, sin), apply_rotary(qkv[:, :12], cos, sin))


@pytest.mark.parametrize("batch,queries,keys", [(1, 1, 1), (1, 1, 37), (3, 1, 200), (2, 7, 7), (1, 5, 40)])
def test_fused_attention_matches_reference(batch, queries, keys):
    """float32 tolerance 1e-5; masks (padding, decode batches) and the causal rule with a cached prefix."""
    from leanlm.layers.attention import fused_attention, reference_attention

    generator = torch.Generator().manual_seed(keys)
    cache = torch.randn(2, 3, 300, 64, generator=generator)  # (k/v, H_kv, slots, D): reads are strided slices
    k, v = (cache[i, :, 5 : 5 + keys].expand(batch, -1, -1, -1) for i in (0, 1))
    q = torch.randn(batch, 9, queries, 64, generator=generator)
    mask = torch.rand(batch, 1, queries, keys, generator=generator) > 0.3
    mask[..., 0] = True  # every query sees at least one key, as in the model
    for m in (None, mask):
        torch.testing.assert_close(fused_attention(q, k, v, m), reference_attention(q, k, v, m), atol=1e-5, rtol=1e-5)


def test_fused_attention_gives_a_query_the_same_bits_in_any_chunk():
    """A prompt's queries computed all at once, in two chunks over a cached prefix, or one at a time."""
    from leanlm.layers.attention import fused_attention

    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 9, 30, 64, generator=generator)
    k, v = torch.randn(1, 3, 30, 64, generator=generator), torch.randn(1, 3, 30, 64, generator=generator)
    whole = fused_attention(q, k, v)
    chunk = fused_attention(q[:, :, 12:], k, v)  # queries 12..29 over keys 0..29
    assert torch.equal(chunk, whole[:, :, 12:])
    for t in (0, 17, 29):
        assert torch.equal(
            fused_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1]), whole[:, :, t : t + 1]
        )


@pytest.mark.parametrize(
    "weight",
    [
        random_weight(21, 576, "q4", 128, seed=1),  # a short last group
        random_weight(13, 96, "q8", 32, seed=2),
        random_weight(9, 64, "q8-sub16-offset", 16, seed=3),
        k_quant_weight(11, 512, "q4-k", seed=4),
        k_quant_weight(11, 512, "q8-sub16-k", seed=5),
    ],
    ids=["q4-g128", "q8", "q8-sub16-offset", "q4-k", "q8-sub16-k"],
)
def test_a_layer_on_the_kernels_holds_its_weight_once(weight):
    """The stored form goes once packed; reading it (artifact saving, a later prepare_runtime) unpacks it exactly."""
    layer = QuantizedLinear(weight)
    layer.prepare_runtime(torch.float32, torch.device("cpu"), "exact")
    assert "codes" not in layer._buffers and "scale" not in dict(layer.named_buffers())
    for name in ("codes", "scale", "offset", "scale_base", "offset_base"):
        original, restored = getattr(weight, name), getattr(layer, name)
        assert (original is None and restored is None) or (
            torch.equal(original, restored) and original.dtype == restored.dtype
        )
    x = torch.randn(2, weight.codes.shape[1])
    fast = layer(x)
    assert layer.prepare_runtime(torch.float32, torch.device("cpu"), "torch") in ("int4pack", "int8pack", "dense")
    assert torch.equal(layer.codes, weight.codes)
    assert relative_error(layer(x), fast.double()) < EXACT_TOLERANCE


# ---- 16-bit weights (kernels/csrc/half_linear.cpp): bfloat16/float16 matrices, float32 activations ----------------
# Tolerance: the weights are converted exactly, so only float32 summation differs from float64: 1e-5 relative.
# Shapes: rows around the 4- and 2-row tiles and the 16-row task blocks, batches around the 4-row tile, widths
# with and without a tail past the last chunk (16 inputs, 32 in mode auto), with an odd or even count of full
# chunks before it (each pair sums chunk c into chain c mod 2).
HALF_SHAPES = [(1, 1, 1), (13, 1, 37), (29, 5, 577), (64, 4, 576), (70, 9, 96), (131, 3, 1536), (7, 2, 53), (19, 6, 80)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,batch,columns", HALF_SHAPES)
def test_half_linear_matches_reference(dtype, rows, batch, columns):
    generator = torch.Generator().manual_seed(rows + columns)
    weight = (torch.randn(rows, columns, generator=generator) * 0.1).to(dtype)
    x, bias = torch.randn(batch, columns, generator=generator), torch.randn(rows, generator=generator)
    reference = x.double() @ weight.double().t() + bias.double()
    out = torch.ops.leanlm.half_linear(x, weight, bias)
    assert out.dtype == torch.float32 and out.shape == (batch, rows)
    assert relative_error(out, reference) < EXACT_TOLERANCE
    assert relative_error(torch.ops.leanlm.half_linear(x.bfloat16(), weight, None).float(), reference - bias) < 1e-2
    # mode "auto": bfloat16 activations (vdpbf16ps where the CPU has it); float16 weights keep float32 activations
    rounded = torch.ops.leanlm.half_linear(x, weight, bias, True)
    x_read = x.bfloat16() if dtype == torch.bfloat16 else x
    assert relative_error(rounded, x_read.double() @ weight.double().t() + bias.double()) < EXACT_TOLERANCE


@pytest.mark.parametrize(
    "dtype,round_activations", [(torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)]
)
@pytest.mark.parametrize("columns", [100, 53, 96])  # tails after an even or odd count of chunks, no tail
def test_half_linear_rows_do_not_depend_on_the_batch(dtype, round_activations, columns):
    """Bit for bit, as for the quantized kernels: a row alone, in a tile of 4 or among the single rows."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(75, columns, generator=generator).to(dtype)  # rows: 4 blocks of 16, then 11

    def run(x):
        return torch.ops.leanlm.half_linear(x, weight, None, round_activations)

    x = torch.randn(2, 31, columns, generator=generator)
    batched = run(x).reshape(-1, 75)
    rows = x.reshape(-1, columns)
    for i in (0, 5, 30, 61):
        assert torch.equal(run(rows[i : i + 1])[0], batched[i])
    assert torch.equal(run(rows[:3]), batched[:3])


def test_half_linear_refuses_other_weights():
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        torch.ops.leanlm.half_linear(torch.randn(2, 8), torch.randn(4, 8), None)
    with pytest.raises(RuntimeError, match="x has 7 features, the weight expects 8"):
        torch.ops.leanlm.half_linear(torch.randn(2, 7), torch.randn(4, 8).bfloat16(), None)


@pytest.mark.parametrize("columns", [37, 64])
def test_half_linear_rounds_activations_as_torch_does(columns):
    """Mode auto rounds x to bfloat16 (vectorized, then a scalar tail): through an identity matrix every output is
    one exact product, so it must equal torch's rounding bit for bit, ties to even included."""
    generator = torch.Generator().manual_seed(columns)
    x = torch.randn(3, columns, generator=generator) * 100
    ties = (x.view(torch.int32) & ~0xFFFF) | 0x8000  # exactly halfway between two bfloat16 values
    x[1] = ties[1].view(torch.float32)
    out = torch.ops.leanlm.half_linear(x, torch.eye(columns, dtype=torch.bfloat16), None, True)
    assert torch.equal(out, x.bfloat16().float())

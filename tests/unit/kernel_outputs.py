"""Outputs of every leanlm kernel on fixed random inputs: odd shapes, batch 1 and above, int8 and float activations.

test_kernels_avx2.py computes them in this process (the native build) and, through `python kernel_outputs.py OUT`
with LEANLM_KERNEL_VARIANT=avx2, in the AVX2-only build, and compares the two.
"""

from __future__ import annotations

import sys

import torch

# (rows, batch, columns): rows not a multiple of the 8-row interleave, batches around the 4-row tile and the
# 4-row threshold of the 512-bit group pairs, widths of 1 to 48 blocks.
LINEAR_SHAPES = [(13, 1, 64), (70, 3, 96), (200, 4, 160), (577, 9, 576), (64, 17, 1536)]
HALF_SHAPES = [(29, 5, 577), (3, 2, 7), (7, 2, 53), (19, 6, 80)]  # any width: tails after odd and even chunk counts
K_QUANT_SHAPES = [(13, 1, 256), (70, 5, 512)]


def kernel_outputs() -> dict[str, torch.Tensor]:
    from test_kernels import k_quant_weight

    from leanlm.kernels import build
    from leanlm.kernels.layout import pack
    from leanlm.layers.quantized_linear import QuantizedTensor

    if not build.load_kernels():
        raise RuntimeError("leanlm kernels unavailable")
    generator = torch.Generator().manual_seed(0)
    outputs = {}
    for rows, batch, columns in LINEAR_SHAPES:
        groups = columns // 32
        scale = (torch.rand(rows, groups, generator=generator) * 0.02 + 1e-3).half().float()
        x = torch.randn(batch, columns, generator=generator)
        q4 = QuantizedTensor(
            torch.randint(0, 16, (rows, columns), dtype=torch.uint8, generator=generator),
            scale,
            (torch.randn(rows, groups, generator=generator) * 0.05).half().float(),
            4,
            32,
        )
        q8 = QuantizedTensor(
            torch.randint(-127, 128, (rows, columns), dtype=torch.int8, generator=generator), scale, None, 8, 32
        )
        sub16 = QuantizedTensor(  # GGUF Q6_K's form: 6-bit codes, a scale per 16 inputs, here with offsets per 32
            torch.randint(-32, 32, (rows, columns), dtype=torch.int8, generator=generator),
            (torch.rand(rows, 2 * groups, generator=generator) * 0.02 + 1e-3),
            (torch.randn(rows, groups, generator=generator) * 0.05).repeat_interleave(2, dim=1),
            6,
            16,
        )
        q5 = QuantizedTensor(  # GGUF Q5_0's form: signed 5-bit codes, packed 5 bits a code
            torch.randint(-16, 16, (rows, columns), dtype=torch.int8, generator=generator), scale, None, 5, 32
        )
        q5_offset = QuantizedTensor(  # Q5_1/Q5_K's: unsigned 5-bit codes with offsets
            torch.randint(0, 32, (rows, columns), dtype=torch.int8, generator=generator), scale, q4.offset, 5, 32
        )
        kinds = (("q4", q4), ("q8", q8), ("q8-sub16", sub16), ("q5", q5), ("q5-offset", q5_offset))
        for kind, weight in kinds:
            p = pack(weight)
            for int8_activations in (True, False):
                key = f"{kind} {rows}x{columns} batch {batch} {'int8' if int8_activations else 'float'} act."
                if p.q4:
                    out = torch.ops.leanlm.q4_linear(x, p.codes, p.scales, p.offsets, None, p.rows, int8_activations)
                else:
                    out = torch.ops.leanlm.q8_linear(x, p.codes, p.scales, p.offsets, None, p.rows, int8_activations)
                outputs[key] = out
            outputs[f"{kind} {rows}x{columns} dequantize"] = torch.ops.leanlm.dequantize(
                p.codes, p.scales, p.offsets, p.rows
            )
    for rows, batch, columns in K_QUANT_SHAPES:  # K-quant parameters: int8 multipliers of float16 bases
        for kind in ("q4-k", "q8-sub16-k"):
            p = pack(k_quant_weight(rows, columns, kind, seed=rows))
            op = torch.ops.leanlm.q4_linear if p.q4 else torch.ops.leanlm.q8_linear
            x = torch.randn(batch, columns, generator=generator)
            for int8_activations in (True, False):
                key = f"{kind} {rows}x{columns} batch {batch} {'int8' if int8_activations else 'float'} act."
                outputs[key] = op(x, *p.tensors()[:3], None, p.rows, int8_activations, *p.tensors()[3:])
    for rows, batch, columns in LINEAR_SHAPES + HALF_SHAPES:  # 16-bit weights, float32 activations
        x = torch.randn(batch, columns, generator=generator)
        weight = torch.randn(rows, columns, generator=generator) * 0.1
        for dtype in (torch.bfloat16, torch.float16):
            outputs[f"{dtype} {rows}x{columns} batch {batch}"] = torch.ops.leanlm.half_linear(x, weight.to(dtype), None)
    x = torch.randn(3, 7, 576, generator=generator) * 4
    outputs["rms_norm"] = torch.ops.leanlm.rms_norm(x, torch.rand(576, generator=generator) + 0.5, 1e-5)
    outputs["silu_mul"] = torch.ops.leanlm.silu_mul(torch.randn(2, 5, 2 * 96, generator=generator) * 3)
    qkv = torch.randn(2, 5, 15, 64, generator=generator).transpose(1, 2)
    cos, sin = torch.randn(2, 1, 5, 64, generator=generator), torch.randn(2, 1, 5, 64, generator=generator)
    outputs["rotary"] = torch.ops.leanlm.rotary(qkv[:, :12], cos, sin)
    q = torch.randn(2, 9, 7, 64, generator=generator)
    k, v = torch.randn(2, 3, 40, 64, generator=generator), torch.randn(2, 3, 40, 64, generator=generator)
    mask = torch.ones(7, 40, dtype=torch.bool).tril(diagonal=33).expand(2, 1, 7, 40)
    outputs["causal_attention"] = torch.ops.leanlm.causal_attention(q, k, v, mask, 0.125)
    return outputs


def build_facts() -> dict[str, str]:
    """Which variant this process loaded, and the compiler flags its build folder was made with."""
    from leanlm.kernels import build

    name = build.variant()
    ninja_file = build.build_directory(name) / "build.ninja"
    return {"variant": name, "build.ninja": ninja_file.read_text() if ninja_file.is_file() else ""}


if __name__ == "__main__":
    results = kernel_outputs()
    torch.save({"outputs": results, "facts": build_facts()}, sys.argv[1])

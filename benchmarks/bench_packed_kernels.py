"""Packed 5/6-bit kernel layout against the 8-bit layout it replaces (issue 13), on the same weights.

GGUF's Q6_K and Q5_0 codes used to be held one byte each (leanlm's q8 layout); packed they take 6 or 5 bits, and
the kernels decode them in registers to the same int8 dot products (the same output bits). This times
`torch.ops.leanlm.q8_linear` on both layouts of one random weight of a Qwen2.5-1.5B or Gemma 3 shape, interleaved,
best of --repetitions (the least disturbed run on a shared machine), 2 threads, int8 activations (the default), and
reports the weight bytes each layout reads and the effective GB/s.

    python benchmarks/bench_packed_kernels.py [--batches 1,8] [--repetitions 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from unittest import mock

import torch

from leanlm.bench.machine import cpu_model
from leanlm.kernels import build, layout
from leanlm.layers.quantized_tensor import QuantizedTensor

# (name, rows, columns, bits, group): the Q6_K down projection and LM head of Qwen2.5-1.5B, Gemma 3 270M's Q5_0
# gate/up projection.
SHAPES = [
    ("qwen down Q6_K", 1536, 8960, 6, 16),
    ("qwen head Q6_K", 151936, 1536, 6, 16),
    ("gemma gate_up Q5_0", 4096, 640, 5, 32),
]


def weight(rows: int, columns: int, bits: int, group: int) -> QuantizedTensor:
    generator = torch.Generator().manual_seed(0)
    half = 1 << (bits - 1)
    codes = torch.randint(-half, half, (rows, columns), dtype=torch.int8, generator=generator)
    scale = (torch.rand(rows, columns // group, generator=generator) * 0.02 + 1e-3).half().float()
    return QuantizedTensor(codes, scale, None, bits, group)


def call(packed: layout.KernelWeight, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.leanlm.q8_linear(x, *packed.tensors()[:3], None, packed.rows, True, *packed.tensors()[3:])


def best_seconds(packed: layout.KernelWeight, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call(packed, x)
    return (time.perf_counter() - start) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repetitions", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not build.load_kernels():
        print("leanlm kernels unavailable", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, {args.threads} threads, 1-minute load {os.getloadavg()[0]:.1f}, best of {args.repetitions}")
    print("| weight | batch | layout | MB read | ms | GB/s | packed speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, rows, columns, bits, group in SHAPES:
        w = weight(rows, columns, bits, group)
        packed = layout.pack(w)
        with mock.patch.object(layout, "packed_bits", lambda _: None):
            wide = layout.pack(w)
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, columns, generator=torch.Generator().manual_seed(1))
            assert torch.equal(call(packed, x), call(wide, x)), "the layouts must give the same bits"
            calls = max(1, int(2e8 // wide.nbytes()))  # ~0.2 GB of weights per timing
            times = {"8-bit": [], f"{bits}-bit": []}
            for _ in range(args.repetitions):  # interleaved: load drift hits both
                times["8-bit"].append(best_seconds(wide, x, calls))
                times[f"{bits}-bit"].append(best_seconds(packed, x, calls))
            best = {k: min(v) for k, v in times.items()}
            for label, kernel in (("8-bit", wide), (f"{bits}-bit", packed)):
                speedup = f"{best['8-bit'] / best[label]:.2f}x" if label != "8-bit" else ""
                print(
                    f"| {name} {rows}x{columns} | {batch} | {label} | {kernel.nbytes() / 1e6:.1f} | "
                    f"{best[label] * 1e3:.3f} | {kernel.nbytes() / best[label] / 1e9:.1f} | {speedup} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""leanlm's 16-bit matrix kernel (kernels/csrc/half_linear.cpp) alone, over the matrices of one decode token of
SmolLM2-135M (30 layers of qkv / o / gate_up / down and the 49152-row tied head: 270 MB of bfloat16, so each call
reads its weights from memory, not cache), random weights. Best of --repetitions, 1 and 2 threads, modes auto
(bfloat16-rounded activations, vdpbf16ps) and exact (float32 activations), batch 1 (decode) and a 120-row prefill
of the layers (no head); reports ms and the weight bytes streamed per second. One thread is timed in CPU time
(process_time), two in wall-clock time.

    python benchmarks/bench_half_linear.py [--repetitions 20] [--threads 1,2] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch

# (rows, cols) per layer of SmolLM2-135M: fused qkv, o, fused gate_up, down; then the tied head.
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LAYERS, HEAD = 30, (49152, 576)


def token_time(weights: list[torch.Tensor], batch: int, round_activations: bool, repetitions: int) -> float:
    # One thread: this process's CPU time (survives a shared machine: time spent descheduled does not count).
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}
    best = float("inf")
    for _ in range(repetitions):
        start = clock()
        for w in weights:
            torch.ops.leanlm.half_linear(inputs[w.shape[1]], w, None, round_activations)
        best = min(best, clock() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--prefill-rows", type=int, default=120)
    args = parser.parse_args()
    from leanlm.bench.machine import cpu_model
    from leanlm.kernels.build import load_kernels, variant

    if not load_kernels():
        raise SystemExit("leanlm's kernels are unavailable here (see the warning above).")
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    layers = [(torch.randn(*s, generator=generator) * 0.05).to(dtype) for _ in range(LAYERS) for s in LAYER_SHAPES]
    head = (torch.randn(*HEAD, generator=generator) * 0.05).to(dtype)
    decode_bytes = sum(w.numel() * 2 for w in layers) + head.numel() * 2
    print(
        f"CPU: {cpu_model()}, kernel build {variant()}, {args.dtype} weights, {decode_bytes / 1e6:.0f} MB per token,"
        f" best of {args.repetitions}"
    )
    print(f"{'threads':>7} {'mode':>5} {'decode ms':>9} {'GB/s':>6} {'prefill ms':>10} {'GFLOP/s':>8}")
    flops = 2 * args.prefill_rows * sum(w.numel() for w in layers)
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for mode, rounded in (("auto", True), ("exact", False)):
            decode = token_time(layers + [head], 1, rounded, args.repetitions)
            prefill = token_time(layers, args.prefill_rows, rounded, max(2, args.repetitions // 5))
            print(
                f"{threads:>7} {mode:>5} {decode * 1e3:>9.2f} {decode_bytes / decode / 1e9:>6.1f}"
                f" {prefill * 1e3:>10.1f} {flops / prefill / 1e9:>8.0f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

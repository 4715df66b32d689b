"""2:4 semi-structured sparsity on CUDA: torch's sparse kernels (cuSPARSELt, CUTLASS) against dense bfloat16 on the
default model's projection shapes and a large one, at decode and prefill batch sizes. Needs only torch and an
Ampere-or-newer GPU; no checkpoint (random weights pruned 2:4 by magnitude have the same shapes and kernels).

Times are CUDA-event medians of 100 calls after 20 warm-up calls. Output is checked against the dense product.

    python benchmarks/cuda_sparse_24.py
"""

from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F

SHAPES = {  # name -> (out_features, in_features)
    "qkv_proj 960x576": (960, 576),
    "gate_up_proj 3072x576": (3072, 576),
    "down_proj 576x1536": (576, 1536),
    "lm_head-sized 49152x576": (49152, 576),
    "large 8192x8192": (8192, 8192),
}
BATCHES = (1, 32, 512, 4096)


def prune_24(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive inputs."""
    groups = weight.view(weight.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    return (groups * keep).view_as(weight)


def cuda_time(fn, *args) -> float:
    for _ in range(20):
        fn(*args)
    times = []
    for _ in range(100):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)  # microseconds


def main() -> int:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| matrix | batch | dense bf16 us | " + " | ".join(f"2:4 {b} us" for b in ("cuSPARSELt", "CUTLASS")) + " |")
    print("|---|---|---|---|---|")
    for name, (out_features, in_features) in SHAPES.items():
        weight = prune_24(torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16))
        sparse = {}
        for backend, force_cutlass in (("cuSPARSELt", False), ("CUTLASS", True)):
            SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
            try:
                sparse[backend] = to_sparse_semi_structured(weight)
            except Exception as exc:  # a backend missing from this build: report, go on
                print(f"{backend} unavailable: {exc}", file=sys.stderr)
        for batch in BATCHES:
            x = torch.randn(max(batch, 1), in_features, device="cuda", dtype=torch.bfloat16)
            dense_us = cuda_time(F.linear, x, weight)
            cells = []
            for backend in ("cuSPARSELt", "CUTLASS"):
                if backend not in sparse:
                    cells.append("-")
                    continue
                try:
                    out = F.linear(x, sparse[backend])
                    torch.testing.assert_close(out, F.linear(x, weight), rtol=2e-2, atol=2e-1)
                    cells.append(f"{cuda_time(F.linear, x, sparse[backend]):.1f}")
                except Exception as exc:
                    cells.append(f"fails ({type(exc).__name__})")
            print(f"| {name} | {batch} | {dense_us:.1f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

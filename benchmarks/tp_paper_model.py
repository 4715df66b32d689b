"""The paper model of tensor-parallel decode speed (docs/TENSOR_PARALLEL.md), evaluated for 1-8 ranks on one host
and over a network. No measurement: every input is an assumption stated below; the measured figures of this
machine come from bench_tensor_parallel.py.

    t(n) = (W_layers / n + W_head) / B  +  2 L a(n)        a(n) = k(n) alpha + 2 (n - 1) / n  h s / beta

W_layers: bytes of the decoder layers' weights read per step, W_head: the (replicated) LM head's; B: memory
bandwidth of one rank; L: layers (two all-reduces each); a(n): one all-reduce of a hidden row of h values of s bytes
over n ranks: k(n) latency steps of alpha each (ring: 2 (n - 1); tree: 2 ceil(log2 n)) plus the bytes each rank
moves at link bandwidth beta.

    python benchmarks/tp_paper_model.py
"""

from __future__ import annotations

import math

MODELS = {  # bf16 weights: (W_layers bytes, W_head bytes, layers, hidden)
    "Llama-3-8B": (13.96e9, 1.05e9, 32, 4096),
    "Llama-3-70B": (137.6e9, 2.1e9, 80, 8192),
}
LINKS = {  # per-rank HBM bandwidth (H200: 4.8 TB/s), per-step latency alpha (s), link bandwidth beta (B/s), steps
    "one host, NVLink (NCCL tree, alpha 5 us)": (4.8e12, 5e-6, 450e9, lambda n: 2 * math.ceil(math.log2(n))),
    "network, InfiniBand 400 Gb/s RDMA (ring, alpha 3 us)": (4.8e12, 3e-6, 50e9, lambda n: 2 * (n - 1)),
    "network, 100 GbE TCP (ring, alpha 25 us)": (4.8e12, 25e-6, 12.5e9, lambda n: 2 * (n - 1)),
}


def all_reduce_s(n: int, hidden: int, alpha: float, beta: float, steps, value_bytes: int = 2) -> float:
    return 0.0 if n == 1 else steps(n) * alpha + 2 * (n - 1) / n * hidden * value_bytes / beta


def step_s(model: tuple, link: tuple, n: int) -> float:
    w_layers, w_head, layers, hidden = model
    bandwidth, alpha, beta, steps = link
    return (w_layers / n + w_head) / bandwidth + 2 * layers * all_reduce_s(n, hidden, alpha, beta, steps)


def main() -> None:
    for model_name, model in MODELS.items():
        print(f"\n{model_name}, bf16, batch-1 decode: tok/s (of which all-reduce, ms per token)\n")
        print("| link | 1 rank | 2 ranks | 4 ranks | 8 ranks |")
        print("|---|---|---|---|---|")
        for link_name, link in LINKS.items():
            cells = []
            for n in (1, 2, 4, 8):
                reduce_ms = 2 * model[2] * all_reduce_s(n, model[3], *link[1:]) * 1e3
                cells.append(f"{1 / step_s(model, link, n):.0f} ({reduce_ms:.2f})")
            print(f"| {link_name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

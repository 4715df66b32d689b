"""Does torch.compile pay for the decode step? The bare model's one-token step over a contiguous KV cache, eager
against torch.compile (default wrapper, then inductor's C++ wrapper), with leanlm's kernels and fused ops.

Prints compile time and the median step time of each. Engine overhead (scheduling, sampling) is not included.

    python benchmarks/compile_decode.py [--steps 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from leanlm.cache.kv_cache import KVCache
from leanlm.formats.assets import default_model_path
from leanlm.models.checkpoint import load_checkpoint
from leanlm.models.registry import build_model


def step_times(forward, model, steps: int, context: int = 120) -> tuple[float, float]:
    config = model.config
    cache = KVCache(config.num_layers, 1, config.num_kv_heads, context + steps + 8, config.head_dim, torch.float32)
    with torch.inference_mode():
        model(
            torch.ones(1, context, dtype=torch.long),
            torch.arange(context)[None],
            cache.attention(0, model.attention),
            True,
        )
        started = time.perf_counter()
        forward(
            torch.tensor([[5]]), torch.tensor([[context]]), cache.attention(context, model.attention)
        )  # compiles, when compiled
        first = time.perf_counter() - started
        times = []
        for i in range(1, steps):
            started = time.perf_counter()
            forward(torch.tensor([[5]]), torch.tensor([[context + i]]), cache.attention(context + i, model.attention))
            times.append(time.perf_counter() - started)
    return first, 1000 * statistics.median(times[steps // 4 :])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    checkpoint = load_checkpoint(default_model_path(), torch.float32, native_quant=True)
    model = build_model(checkpoint.config, checkpoint.weights, torch.float32, "cpu", "auto")
    _, eager = step_times(model, model, args.steps)
    print(f"eager: {eager:.2f} ms/step")
    for label, options in (("compile", {}), ("compile cpp_wrapper", {"cpp_wrapper": True})):
        torch._dynamo.reset()
        compiled = torch.compile(model, dynamic=True, options=options)
        try:
            first, ms = step_times(compiled, model, args.steps)
        except Exception as error:  # report, keep going: this is an experiment
            print(f"{label}: failed ({type(error).__name__}: {str(error).splitlines()[0][:160]})")
            continue
        print(f"{label}: first call {first:.1f} s, then {ms:.2f} ms/step ({eager / ms:.2f}x eager)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

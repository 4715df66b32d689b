"""leanlm against llama.cpp on the same GGUF in CPU seconds per token, 1 thread: a comparison that survives a
shared machine better than tok/s. On a busy host a 2-thread run mostly measures how long each thread waits for a
core (every parallel region waits for its slowest thread); one thread's own CPU time (time.process_time) counts
only the time it ran, so its ratio between engines stays meaningful (the memory bus is still shared, so absolute
figures still inflate under load).

Each engine runs in a fresh process (leanlm.bench.engines, the same engines as bench_families.py), interleaved
A B A B, greedy, EOS ignored, a 120-token prompt then --tokens tokens; medians over --repetitions.

    python benchmarks/bench_cpu_time.py --model FILE.gguf [--tokens 64] [--repetitions 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(engine_name: str, model: str, tokens: int) -> dict:
    """In this (fresh) process: CPU seconds of the prefill and per decoded token, one thread."""
    import torch

    from leanlm.bench import engines
    from leanlm.bench.worker import WARMUP_TEXT, prompt_ids, prompt_text
    from leanlm.models.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    engines.time.perf_counter = time.process_time  # time_generation's clock: this process's CPU time
    engine = engines.ENGINES[engine_name]()
    engine.load(Path(model), "auto", "cpu", 1)
    tokenizer = load_checkpoint(model, torch.float32, weights=False).tokenizer
    engine.generate(prompt_ids(tokenizer, WARMUP_TEXT, 16, 1), 4)
    ttft, total = engine.generate(prompt_ids(tokenizer, prompt_text(), 120, 1), tokens)
    return {
        "prefill_cpu_ms_per_token": 1e3 * ttft / 120,
        "decode_cpu_ms_per_token": 1e3 * (total - ttft) / (tokens - 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # engine name: measure in this process
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.model, args.tokens)))
        return 0
    from leanlm.bench.machine import cpu_model

    samples: dict[str, list[dict]] = {"leanlm": [], "llama.cpp": []}
    for _ in range(args.repetitions):
        for name in samples:  # interleaved: load drift hits both
            command = [sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens), "--worker", name]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            samples[name].append(json.loads(out))
            print(f"  {name}: {samples[name][-1]}", flush=True)
    print(f"{args.model} | 1 thread on {cpu_model()} | CPU ms per token, medians of {args.repetitions}")
    medians = {}
    for name, runs in samples.items():
        medians[name] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        prefill, decode = medians[name]["prefill_cpu_ms_per_token"], medians[name]["decode_cpu_ms_per_token"]
        print(f"{name:10s} prefill {prefill:.2f} ms/token  decode {decode:.2f} ms/token")
    for key in ("prefill_cpu_ms_per_token", "decode_cpu_ms_per_token"):
        ratio = medians["llama.cpp"][key] / medians["leanlm"][key]
        print(f"leanlm speed / llama.cpp speed, {key.split('_')[0]}: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

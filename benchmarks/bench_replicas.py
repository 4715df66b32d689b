"""Replicas on Ray Serve: aggregate output tok/s of `serve --replicas` with 1 and with 2 replicas of the default model,
each replica pinned to one core and running one thread, in one run (1 2 1 2 ... on one Ray cluster, redeployed
between rounds so load drift hits both). Each round sends --requests completions (distinct prompts, greedy, EOS
ignored, --max-tokens each) from --concurrency clients through the one endpoint.

    python benchmarks/bench_replicas.py [--repeats 2] [--requests 24] [--concurrency 8] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import time
from pathlib import Path

import httpx

from leanlm.bench.machine import describe

TOPICS = ["the sea", "a city at night", "an old library", "mountain weather", "a chess game", "bread", "rivers"]


async def round_of_requests(base: str, requests: int, concurrency: int, max_tokens: int, salt: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        body = {"model": "bench", "prompt": f"Round {salt} request {i}: write about {TOPICS[i % len(TOPICS)]}.",
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}  # fmt: skip
        async with gate:
            answer = await client.post(f"{base}/v1/completions", json=body)
            answer.raise_for_status()
            tokens += answer.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(requests)))
        elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (Q4_1 GGUF)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import ray
    from ray import serve

    from leanlm.server.replicas.deployment import ReplicaOptions, start_replicas
    from leanlm.server.serving import ServerSettings

    machine = describe(threads=1)
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; torch {machine['torch']}", flush=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    try:
        for repeat in range(args.repeats):
            for replicas in (1, 2):
                options = ReplicaOptions(replicas=replicas, cpus_per_replica=1, pin_cores=True)
                llm_options = {"model": args.model, "threads": 1}
                start_replicas(llm_options, ServerSettings(model_name="bench"), options, "127.0.0.1", port)
                asyncio.run(round_of_requests(base, 2 * replicas, replicas, 4, salt=-1))  # warm-up
                result = asyncio.run(
                    round_of_requests(base, args.requests, args.concurrency, args.max_tokens, salt=repeat)
                )
                runs[replicas].append(result)
                print(f"repeat {repeat}: {replicas} replica(s): {result['tok_s']:.1f} tok/s", flush=True)
                serve.delete("leanlm")
    finally:
        serve.shutdown()
        ray.shutdown()
    report = {"machine": machine, "settings": vars(args), "runs": runs,
              "median_tok_s": {n: statistics.median(r["tok_s"] for r in rs) for n, rs in runs.items()}}  # fmt: skip
    print(json.dumps(report, indent=2))
    print("\n| replicas (1 core, 1 thread each) | aggregate output tok/s (median) | runs |")
    print("|---|---|---|")
    for n, rs in runs.items():
        each = ", ".join(f"{r['tok_s']:.1f}" for r in rs)
        print(f"| {n} | {report['median_tok_s'][n]:.1f} | {each} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

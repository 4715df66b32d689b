"""Serving benchmark: `leanlm serve` on the default model, N streamed requests at concurrency 1, 4, 16, 32.

Starts the server in its own process on a free localhost port, warms it up, then for each concurrency level
replays the same kind of requests (distinct prompts of mixed length, greedy, EOS ignored so that every
request generates exactly --max-tokens) and reports aggregate output tok/s, time to first token (p50/p99)
and inter-token latency (gaps between streamed chunks, p50/p99), as JSON and as a markdown table.
Target on the default model: output tok/s at concurrency 16 >= 5x the single-stream rate.

    python benchmarks/bench_serve.py [--concurrency 1,4,16,32] [--requests 0] [--max-tokens 64]
                                     [--json out/bench_serve.json] [--model M] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from leanlm.bench.machine import describe

TOPICS = ["the sea", "a city at night", "an old library", "mountain weather", "a chess game", "bread", "rivers"]
SENTENCE = "Describe it with care, in plain words, and keep to what a reader can picture. "


@dataclass
class RequestResult:
    ttft_s: float
    gaps_s: list[float] = field(default_factory=list)
    output_tokens: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def prompt_for(index: int) -> str:
    # Distinct openings (no shared prefix for the cache to reuse) and lengths from ~15 to ~130 tokens.
    return f"Request {index}: write about {TOPICS[index % len(TOPICS)]}. " + SENTENCE * (index % 8)


async def one_request(client: httpx.AsyncClient, index: int, max_tokens: int) -> RequestResult:
    body = {
        "model": "bench",
        "prompt": prompt_for(index),
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    result, last = RequestResult(ttft_s=float("nan")), None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            now = time.perf_counter()
            if event.get("usage"):
                result.output_tokens = event["usage"]["completion_tokens"]
            elif event["choices"][0]["text"]:
                if last is None:
                    result.ttft_s = now - started
                else:
                    result.gaps_s.append(now - last)
                last = now
    return result


async def run_level(url: str, concurrency: int, requests: int, max_tokens: int, first_index: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)

    async def gated(client: httpx.AsyncClient, index: int) -> RequestResult:
        async with gate:
            return await one_request(client, index, max_tokens)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(gated(client, first_index + i) for i in range(requests)))
        wall = time.perf_counter() - started
    tokens = sum(r.output_tokens for r in results)
    ttfts = [r.ttft_s for r in results]
    gaps = [g for r in results for g in r.gaps_s]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "output_tokens": tokens,
        "wall_s": round(wall, 2),
        "output_tok_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1),
        "ttft_p99_ms": round(1000 * percentile(ttfts, 99), 1),
        "itl_p50_ms": round(1000 * percentile(gaps, 50), 1),
        "itl_p99_ms": round(1000 * percentile(gaps, 99), 1),
    }


def markdown(rows: list[dict]) -> str:
    single = rows[0]["output_tok_s"] if rows and rows[0]["concurrency"] == 1 else None
    lines = [
        "| concurrency | requests | output tok/s | vs 1 stream | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = f"{row['output_tok_s'] / single:.2f}x" if single else "-"
        lines.append(
            f"| {row['concurrency']} | {row['requests']} | {row['output_tok_s']} | {ratio} | {row['ttft_p50_ms']} | "
            f"{row['ttft_p99_ms']} | {row['itl_p50_ms']} | {row['itl_p99_ms']} |"
        )
    return "\n".join(lines)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "leanlm.cli.main", "serve", "--port", str(port), "--served-model-name", "bench"]
    command += ["--threads", str(args.threads), "--log-level", "warning", *args.server_args]
    if args.model:
        command += ["--model", args.model]
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit("the server did not become healthy within 300 s")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model for `leanlm serve` (default: the default model)")
    parser.add_argument("--concurrency", default="1,4,16,32", help="comma-separated levels (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (0 = max(8, 2 x concurrency))")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (EOS ignored)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server (default: %(default)s)")
    parser.add_argument("--json", default="out/bench_serve.json", help="where to write the results")
    parser.add_argument("server_args", nargs="*", help="extra `leanlm serve` options, after --")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    process, url = start_server(args)
    try:
        asyncio.run(run_level(url, 2, 2, 8, first_index=10_000))  # warm-up: first-call costs stay out
        rows, next_index = [], 0
        for concurrency in levels:
            requests = args.requests or max(8, 2 * concurrency)
            row = asyncio.run(run_level(url, concurrency, requests, args.max_tokens, next_index))
            next_index += requests
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        process.terminate()
        process.wait(timeout=60)

    report = {
        "machine": describe(args.threads),
        "model": args.model or "default (SmolLM2-135M-Instruct Q4_1)",
        "max_tokens": args.max_tokens,
        "levels": rows,
    }
    by_level = {row["concurrency"]: row["output_tok_s"] for row in rows}
    if 1 in by_level and 16 in by_level:
        report["speedup_16_vs_1"] = round(by_level[16] / by_level[1], 2)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(rows))
    if "speedup_16_vs_1" in report:
        verdict = "meets" if report["speedup_16_vs_1"] >= 5 else "misses"
        print(f"\nconcurrency 16 vs 1: {report['speedup_16_vs_1']}x output tok/s ({verdict} the 5x target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load on `leanlm serve` (its own process, localhost): many concurrent greedy streams with mixed prompt lengths,
a share of them disconnecting mid-stream. Passes when no response is a 5xx, every surviving stream equals its
single-request output, and the KV blocks in use and the requests in flight return to idle (from /metrics).

Both sides run the default kernels (`--kernels auto`, int8 activations): their per-row arithmetic is the same for
every batch size, so batching is lossless and the comparison is exact.

    python benchmarks/load_server.py [--clients 64] [--disconnect 0.2] [--seed 0] [--model M]

tests/e2e/test_server_load.py runs a bounded profile of this script (32 clients, a quarter disconnecting).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

from leanlm import LLM, SamplingParams
from leanlm.config import EngineConfig, parse_size

KERNELS = "auto"
MAX_TOKENS = 16
MODEL = "smol"
SENTENCE = "The quick brown fox jumps over the lazy dog while the river runs quietly to the sea. "
# (kind, prompt): completions take text, chat takes one user message; lengths from ~5 to ~400 tokens.
SPECS = [
    ("completion", "The capital of France is"),
    ("completion", "def add(a, b):"),
    ("completion", SENTENCE * 3 + "Summary:"),
    ("completion", SENTENCE * 8 + "In short,"),
    ("completion", SENTENCE * 20 + "The end. Next,"),
    ("completion", "Q: What is 2 + 2?\nA:"),
    ("chat", "Give me one word for happy."),
    ("chat", SENTENCE * 6 + "Summarize this in five words."),
]


@dataclass
class Outcome:
    status: int
    text: str = ""
    finish_reason: str | None = None
    disconnected: bool = False
    first_token_s: float | None = None


@dataclass
class LoadResult:
    outcomes: list[Outcome]
    leaving: list[bool]  # which clients were told to leave mid-stream
    mismatches: list[int] = field(default_factory=list)  # surviving clients whose answer differs from solo
    wall_s: float = 0.0


def solo_answers(model_path: str, threads: int = 2) -> list[tuple[str, str | None]]:
    """Each spec's greedy answer when it runs alone."""
    config = EngineConfig(max_num_seqs=1, kv_cache_memory=parse_size("128MiB"))
    llm = LLM(model_path, kernels=KERNELS, engine_config=config, threads=threads)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    answers = []
    for kind, prompt in SPECS:
        out = llm.generate(prompt, params)[0] if kind == "completion" else llm.chat([_message(prompt)], params)[0]
        answers.append((out.text, out.finish_reason))
    return answers


def start_server(model_path: str, threads: int = 2, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "leanlm.cli.main", "serve", "--model", str(model_path)]
    command += ["--port", str(port), "--threads", str(threads), "--kernels", KERNELS, "--served-model-name", MODEL]
    command += ["--log-level", "warning", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, f"http://127.0.0.1:{port}"


def stop_server(process: subprocess.Popen, timeout_s: float = 30) -> bool:
    """SIGTERM, then wait; False (and a kill) when it did not exit in time."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
        return True
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False


def wait_until_healthy(process: subprocess.Popen, url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not _healthy(url):
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stdout.read()}")
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[1])


def wait_until_idle(url: str, idle_blocks: float, timeout_s: float = 15) -> bool:
    """Whether the KV blocks in use and the requests in flight came back to idle within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while metric(url, "leanlm_kv_blocks_used") != idle_blocks or metric(url, "leanlm_requests_in_flight"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return metric(url, "leanlm_requests_running") == 0


async def run_load(
    url: str, clients: int, disconnect_share: float, answers, seed: int = 0, time_limit_s: float = 600
) -> LoadResult:
    """`clients` concurrent streams over SPECS; a seeded `disconnect_share` of them leave after 1-3 chunks."""
    rng = random.Random(seed)
    leaving = [False] * clients
    for i in rng.sample(range(clients), round(clients * disconnect_share)):
        leaving[i] = True
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=time_limit_s, limits=limits) as client:
        tasks = [
            _stream(client, *SPECS[i % len(SPECS)], rng.randint(1, 3) if leaving[i] else None) for i in range(clients)
        ]
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), timeout=time_limit_s)
    result = LoadResult(list(outcomes), leaving, wall_s=time.perf_counter() - started)
    for i, outcome in enumerate(outcomes):
        if not outcome.disconnected and (outcome.text, outcome.finish_reason) != answers[i % len(SPECS)]:
            result.mismatches.append(i)
    return result


async def _stream(client: httpx.AsyncClient, kind: str, prompt: str, disconnect_after: int | None) -> Outcome:
    body = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    if kind == "completion":
        path, body = "/v1/completions", body | {"prompt": prompt}
    else:
        path, body = "/v1/chat/completions", body | {"messages": [_message(prompt)]}
    outcome = Outcome(status=0)
    sent = time.perf_counter()
    async with client.stream("POST", path, json=body) as response:
        outcome.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            return outcome
        chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise RuntimeError(f"an error in the stream: {event}")
            choice = event["choices"][0]
            outcome.text += choice.get("text") or choice.get("delta", {}).get("content") or ""
            outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
            if outcome.first_token_s is None:
                outcome.first_token_s = time.perf_counter() - sent
            chunks += 1
            if disconnect_after is not None and chunks >= disconnect_after:
                outcome.disconnected = True  # leaving the block closes the connection mid-stream
                return outcome
    return outcome


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _message(text: str) -> dict:
    return {"role": "user", "content": text}


def main() -> int:
    from leanlm.bench.machine import describe
    from leanlm.formats.assets import default_model_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--disconnect", type=float, default=0.2, help="share of clients that leave mid-stream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = args.model or str(default_model_path(quiet=True))
    process, url = start_server(model, args.threads, ("--max-num-seqs", str(args.clients)))
    try:
        answers = solo_answers(model, args.threads)  # while the server loads
        wait_until_healthy(process, url)
        idle_blocks = metric(url, "leanlm_kv_blocks_used")
        result = asyncio.run(run_load(url, args.clients, args.disconnect, answers, args.seed))
        idle = wait_until_idle(url, idle_blocks)
        leaked = metric(url, "leanlm_kv_blocks_used") - idle_blocks
        healthy = _healthy(url)
    finally:
        clean_exit = stop_server(process)
    statuses = sorted({o.status for o in result.outcomes})
    finished = [o for o in result.outcomes if not o.disconnected]
    firsts = [o.first_token_s for o in finished if o.first_token_s is not None]
    machine = describe(args.threads)
    print(
        f"{machine['cpu']}, {machine['cores']} cores, {args.threads} threads; {args.clients} streams, "
        f"{sum(result.leaving)} leaving mid-stream (seed {args.seed}); {MAX_TOKENS} tokens each"
    )
    print(f"statuses {statuses}; {len(finished)} finished, {len(result.mismatches)} differ from their solo output")
    print(f"KV blocks leaked: {leaked:.0f}; back to idle: {idle}; /health after: {healthy}; clean exit: {clean_exit}")
    print(f"wall {result.wall_s:.1f} s; first token p50 {statistics.median(firsts):.2f} s, max {max(firsts):.2f} s")
    ok = statuses == [200] and not result.mismatches and idle and leaked == 0 and healthy and clean_exit
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

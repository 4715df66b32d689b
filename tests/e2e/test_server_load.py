"""Load on `leanlm serve` (its own process, localhost): 32 concurrent greedy streams with mixed prompt
lengths, a quarter of them disconnecting early. Every surviving stream must equal its single-request
output, nothing may answer 5xx, and the KV blocks in use must return to their idle count.

Both sides run the default kernels (`--kernels auto`, int8 activations): their per-row arithmetic is the same
for every batch size, so batching is lossless there too.
"""

import asyncio
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import pytest

from leanlm import LLM, SamplingParams
from leanlm.config import EngineConfig, parse_size

pytestmark = pytest.mark.slow

CLIENTS = 32
KERNELS = "auto"
MAX_TOKENS = 16
TIME_LIMIT_S = 150
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


@pytest.fixture(scope="module")
def references(default_gguf_path):
    """Each spec's greedy answer when it runs alone."""
    config = EngineConfig(max_num_seqs=1, kv_cache_memory=parse_size("128MiB"))
    llm = LLM(default_gguf_path, kernels=KERNELS, engine_config=config)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    answers = []
    for kind, prompt in SPECS:
        out = llm.generate(prompt, params)[0] if kind == "completion" else llm.chat([_message(prompt)], params)[0]
        answers.append((out.text, out.finish_reason))
    return answers


@pytest.fixture(scope="module")
def server(default_gguf_path):
    """The server process; it loads the model while the references are computed, and the test waits for it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "leanlm.cli.main", "serve", "--model", str(default_gguf_path)]
    command += ["--port", str(port), "--threads", "2", "--kernels", KERNELS, "--served-model-name", "smol"]
    command += ["--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield process, f"http://127.0.0.1:{port}"
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail("the server did not exit within 30 s of SIGTERM")


def _wait_until_healthy(process: subprocess.Popen, url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not _healthy(url):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _message(text: str) -> dict:
    return {"role": "user", "content": text}


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[1])


async def _stream(client: httpx.AsyncClient, kind: str, prompt: str, disconnect_after: int | None) -> Outcome:
    body = {"model": "smol", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    if kind == "completion":
        path, body = "/v1/completions", body | {"prompt": prompt}
    else:
        path, body = "/v1/chat/completions", body | {"messages": [_message(prompt)]}
    outcome = Outcome(status=0)
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
            assert "error" not in event, event
            choice = event["choices"][0]
            outcome.text += choice.get("text") or choice.get("delta", {}).get("content") or ""
            outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
            chunks += 1
            if disconnect_after is not None and chunks >= disconnect_after:
                outcome.disconnected = True  # leaving the block closes the connection mid-stream
                return outcome
    return outcome


async def _load(url: str) -> list[Outcome]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        tasks = []
        for i in range(CLIENTS):
            kind, prompt = SPECS[i % len(SPECS)]
            disconnect_after = 1 + i % 3 if i % 4 == 3 else None  # every fourth client leaves after 1-3 chunks
            tasks.append(_stream(client, kind, prompt, disconnect_after))
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=TIME_LIMIT_S)


def test_concurrent_streams_equal_single_requests_and_free_their_blocks(server, references):
    process, server = server
    _wait_until_healthy(process, server)
    idle_blocks = _metric(server, "leanlm_kv_blocks_used")
    outcomes = asyncio.run(_load(server))
    assert [o.status for o in outcomes] == [200] * CLIENTS
    survivors = 0
    for i, outcome in enumerate(outcomes):
        if outcome.disconnected:
            continue
        survivors += 1
        assert (outcome.text, outcome.finish_reason) == references[i % len(SPECS)], f"client {i}"
    assert survivors == CLIENTS - CLIENTS // 4
    deadline = time.monotonic() + 15
    while _metric(server, "leanlm_kv_blocks_used") != idle_blocks or _metric(server, "leanlm_requests_in_flight"):
        assert time.monotonic() < deadline, "KV blocks or requests leaked after the load"
        time.sleep(0.2)
    assert _metric(server, "leanlm_requests_running") == 0

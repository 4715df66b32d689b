"""`leanlm serve` end to end: the real engine and default model behind the real uvicorn, driven by `openai`.

Greedy answers through HTTP must equal `LLM.generate`/`LLM.chat` on the same model. The references are
computed before the server starts, because the server's engine thread then owns the (not thread-safe) engine.
"""

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from server_harness import running_server

from leanlm import LLM, SamplingParams
from leanlm.config import EngineConfig, parse_size
from leanlm.server.app import build_app
from leanlm.server.serving import ServerSettings

pytestmark = pytest.mark.slow

KEY = "e2e-key"
MODEL = "smol"
MAX_NUM_SEQS, MAX_QUEUE = 4, 2
PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4, 5,"]
CHAT = [{"role": "user", "content": "Name three colors."}]
GREEDY = SamplingParams(max_tokens=24, temperature=0)
STOP = SamplingParams(max_tokens=40, temperature=0, stop=(" 9",))


@pytest.fixture(scope="module")
def llm(default_gguf_path):
    config = EngineConfig(max_num_seqs=MAX_NUM_SEQS, kv_cache_memory=parse_size("256MiB"))
    return LLM(default_gguf_path, engine_config=config)


@pytest.fixture(scope="module")
def references(llm):
    return {  # one request at a time, as the tests send them
        "completions": [llm.generate(prompt, GREEDY)[0] for prompt in PROMPTS],
        "chat": llm.chat(CHAT, GREEDY)[0],
        "stop": llm.generate(PROMPTS[2], STOP)[0],
        "prompt_tokens": [len(llm.encode(p)) for p in PROMPTS],
    }


@pytest.fixture(scope="module")
def server(llm, references):
    settings = ServerSettings(model_name=MODEL, api_key=KEY, max_queue=MAX_QUEUE, max_tokens_limit=512)
    app = build_app(llm, settings)
    with running_server(app) as (url, _):
        yield url, app


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


def kv_blocks_used(url: str) -> int:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return int(next(line for line in text.splitlines() if line.startswith("leanlm_kv_blocks_used ")).split()[1])


def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_greedy_completions_equal_generate(client, references):
    for prompt, expected, prompt_tokens in zip(
        PROMPTS, references["completions"], references["prompt_tokens"], strict=True
    ):
        result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert result.choices[0].text == expected.text
        assert result.choices[0].finish_reason == expected.finish_reason
        assert result.usage.prompt_tokens == prompt_tokens
        assert result.usage.completion_tokens == len(expected.token_ids)


def test_streamed_completion_equals_generate(client, references):
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == references["completions"][0].text
    assert chunks[-1].choices[0].finish_reason == references["completions"][0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_equals_llm_chat_streamed_or_not(client, references):
    expected = references["chat"]
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].finish_reason == expected.finish_reason
    assert whole.usage.completion_tokens == len(expected.token_ids)
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_stop_strings_are_cut_streamed_or_not(client, references):
    expected = references["stop"]
    assert (expected.text, expected.finish_reason) == (" 6, 7, 8,", "stop")
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=40, temperature=0, stop=[" 9"])
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected.text, "stop")
    stream = client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=40, temperature=0, stop=" 9", stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == expected.text


def test_n_choices_are_seeded_and_indexed(client):
    kwargs = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 1.0, "seed": 11, "n": 3}
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1  # seed, seed+1, seed+2 sample differently
    texts = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(**kwargs, stream=True):
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert list(texts.values()) == [c.text for c in first.choices]


def test_logprobs_are_log_probabilities(client):
    result = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=3)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert logprob <= 0 and 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy picks the most likely token
        assert token in top
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    assert [len(t.top_logprobs) for t in chat.choices[0].logprobs.content] == [2, 2, 2]


def test_bad_requests_are_openai_errors_and_the_server_keeps_serving(client, server, llm):
    url = server[0]
    with pytest.raises(openai.BadRequestError) as negative:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=-5)
    assert negative.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as huge:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=10**9)
    assert huge.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt="hello " * (llm.config.context_length + 10))
    assert too_long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as wrong_type:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": 42}])
    assert wrong_type.value.body["param"] == "messages[0].content"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="Hi")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(model=MODEL, prompt="a")
    auth = {"Authorization": f"Bearer {KEY}"}
    invalid_utf8 = httpx.post(f"{url}/v1/completions", content=b'{"model": "smol", "prompt": "\xc3("}', headers=auth)
    assert invalid_utf8.status_code == 400 and invalid_utf8.json()["error"]["code"] == "invalid_utf8"
    malformed = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers=auth)
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"
    oversized = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "a" * (2 << 20)}, headers=auth)
    assert oversized.status_code == 413
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None


def test_full_queue_is_429_and_a_disconnect_frees_kv_blocks(client, server):
    url, app = server
    wait_for(lambda: app.state.engine.in_flight == 0)
    idle = kv_blocks_used(url)
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 400, "n": MAX_NUM_SEQS, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=headers) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert kv_blocks_used(url) > idle
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model=MODEL, prompt="Hi", n=MAX_QUEUE + 1)
        assert refused.value.response.headers["retry-after"] == "1"
    # the client went away mid-stream: its four requests are aborted and their blocks freed
    wait_for(lambda: app.state.engine.in_flight == 0 and kv_blocks_used(url) == idle, timeout_s=10)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


def test_models_health_and_metrics(client, server):
    url = server[0]
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in (
        "leanlm_requests_running",
        "leanlm_requests_waiting",
        "leanlm_kv_blocks_used",
        "leanlm_prefix_cache_hit_rate",
        "leanlm_time_to_first_token_seconds_bucket",
        "leanlm_inter_token_latency_seconds_bucket",
        "leanlm_generation_tokens_total",
    ):
        assert name in text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_server_shuts_down_gracefully(default_gguf_path):
    """`leanlm serve` in its own process: Ctrl-C during a stream ends the stream with an error event and the
    process exits promptly."""
    port = _free_port()
    command = [sys.executable, "-m", "leanlm.cli.main", "serve", "--model", str(default_gguf_path)]
    command += ["--port", str(port), "--shutdown-timeout", "1", "--threads", "2", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _healthy(url) or process.poll() is not None, timeout_s=120)
        assert process.poll() is None, process.stdout.read()
        body = {"model": default_gguf_path.stem, "prompt": "Once upon a time", "max_tokens": 2000}
        body |= {"ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGINT)
            stopped_at = time.monotonic()
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert json.loads(events[-1])["error"]["code"] == "shutting_down"
        process.wait(timeout=30)
        assert time.monotonic() - stopped_at < 30
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False

"""The HTTP layer over a fake engine (no model): errors, auth, limits, SSE, 429, disconnects, shutdown.

The real engine and model are exercised by tests/e2e/test_server.py; here only the server's own logic is.
"""

import json
import threading
import time

import httpx
import openai
import pytest
from server_fakes import FakeEngine, FakeLLM
from server_harness import running_server

from leanlm.server.app import build_app
from leanlm.server.serving import ServerSettings

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def make_app(engine: FakeEngine | None = None, **settings):
    engine = engine or FakeEngine()
    defaults = {"model_name": "fake", "api_key": KEY, "max_queue": 2, "max_tokens_limit": 100}
    return build_app(FakeLLM(engine), ServerSettings(**{**defaults, **settings}))


@pytest.fixture(scope="module")
def server():
    with running_server(make_app(FakeEngine(step_delay_s=0.001))) as (url, _):
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def wait_until(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def sse_payloads(response: httpx.Response) -> list:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_completion_choices_and_usage(client):
    result = client.completions.create(model="fake", prompt="ab", max_tokens=3, n=2)
    assert [c.text for c in result.choices] == ["<99><100><101>"] * 2
    assert [c.index for c in result.choices] == [0, 1]
    assert {c.finish_reason for c in result.choices} == {"length"}
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (2, 6, 8)


def test_several_prompts_give_prompt_major_choice_indices(client):
    result = client.completions.create(model="fake", prompt=["a", "b"], max_tokens=1, n=2)
    assert [(c.index, c.text) for c in result.choices] == [(0, "<98>"), (1, "<98>"), (2, "<99>"), (3, "<99>")]


def test_default_max_tokens_of_completions_is_16(client):
    assert client.completions.create(model="fake", prompt="a").usage.completion_tokens == 16


def test_stream_is_openai_sse_with_done_and_usage(server):
    body = {"model": "fake", "prompt": "a", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["<98>", "<99>"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


def test_chat_stream_starts_with_the_role(client):
    stream = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "a"}], max_tokens=2, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content for c in chunks) == "<63><64>"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs_in_both_apis(client):
    completion = client.completions.create(model="fake", prompt="a", max_tokens=2, logprobs=1)
    assert completion.choices[0].logprobs.tokens == ["<98>", "<99>"]
    assert completion.choices[0].logprobs.text_offset == [0, 4]
    chat = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "a"}], max_tokens=1, logprobs=True, top_logprobs=1
    )
    token = chat.choices[0].logprobs.content[0]
    assert (token.token, token.logprob, bytes(token.bytes)) == ("<63>", -0.5, b"<63>")


def test_api_key_is_required_everywhere_but_health(server):
    assert httpx.get(f"{server}/health").status_code == 200
    for path in ("/v1/models", "/metrics"):
        response = httpx.get(f"{server}{path}", headers={"Authorization": "Bearer wrong"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


def test_models_list_names_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["fake"]


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b'{"model": "fake", "prompt": "\xff"}', "invalid_utf8"),
        (b'{"model": "fake", "prompt": ', "invalid_json"),
        (b'["model"]', "invalid_json"),
        (b'{"model": "fake", "prompt": "a", "max_tokens": "3"}', "invalid_value"),
    ],
)
def test_malformed_bodies_are_400_with_openai_error(server, content, code):
    response = httpx.post(f"{server}/v1/completions", content=content, headers=AUTH)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"}


def test_errors_map_to_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="other", prompt="a")
    assert unknown.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.completions.create(model="fake", prompt="a", max_tokens=101)
    assert "--max-tokens-limit" in too_many.value.body["message"]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="fake", prompt="a" * 64)
    assert too_long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as empty:
        client.completions.create(model="fake", prompt="")
    assert empty.value.body["param"] == "prompt"


def test_a_prompt_only_the_engine_refuses_is_a_400_naming_the_field():
    with running_server(make_app(FakeEngine(max_cached_tokens=8))) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "a" * 20}])
        assert (refused.value.body["param"], refused.value.body["code"]) == ("messages", "context_length_exceeded")
        assert client.completions.create(model="fake", prompt="a", max_tokens=1).choices[0].text == "<98>"


def test_unknown_route_is_404_json(server):
    response = httpx.post(f"{server}/v1/embeddings", json={}, headers=AUTH)
    assert response.status_code == 404 and "/v1/completions" in response.json()["error"]["message"]


def test_oversized_bodies_are_413_by_header_and_by_stream(server):
    big = json.dumps({"model": "fake", "prompt": "a" * (1 << 20)}).encode()
    assert httpx.post(f"{server}/v1/completions", content=big, headers=AUTH).status_code == 413

    def chunked():  # no Content-Length: the limit holds while the body streams in
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    response = httpx.post(f"{server}/v1/completions", content=chunked(), headers=AUTH)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_full_server_answers_429_with_retry_after():
    app = make_app(FakeEngine(max_num_seqs=1, step_delay_s=0.01), max_queue=0)
    with running_server(app) as (url, _):
        body = {"model": "fake", "prompt": "a", "max_tokens": 100, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH) as first:
            lines = first.iter_lines()  # kept: a dropped line iterator closes the response
            next(lines)
            refused = httpx.post(f"{url}/v1/completions", json={"model": "fake", "prompt": "a"}, headers=AUTH)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="fake", prompt="a")
        wait_until(lambda: app.state.engine.in_flight == 0)
        assert client.completions.create(model="fake", prompt="a", max_tokens=1).choices[0].text == "<98>"


def test_client_disconnect_aborts_the_request():
    engine = FakeEngine(step_delay_s=0.01)
    app = make_app(engine)
    with running_server(app) as (url, _):
        body = {"model": "fake", "prompt": "a", "max_tokens": 100, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH) as response:
            lines = response.iter_lines()
            next(lines)
            assert engine.requests  # still generating
        wait_until(lambda: engine.aborted and not engine.requests)
        wait_until(lambda: app.state.engine.in_flight == 0 and app.state.engine.stats.kv_blocks_used == 0)


def test_disconnect_before_a_non_streamed_answer_aborts_too():
    engine = FakeEngine(step_delay_s=0.01)
    app = make_app(engine)
    with running_server(app) as (url, _):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{url}/v1/completions",
                json={"model": "fake", "prompt": "a", "max_tokens": 100},
                headers=AUTH,
                timeout=0.3,
            )
        wait_until(lambda: engine.aborted and app.state.engine.in_flight == 0)


def test_shutdown_tells_running_streams_and_does_not_hang():
    app = make_app(FakeEngine(step_delay_s=0.02), shutdown_grace_s=0.2)
    with running_server(app) as (url, server):
        body = {"model": "fake", "prompt": "a", "max_tokens": 100, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH) as response:
            lines = response.iter_lines()
            next(lines)
            server.should_exit = True
            started = time.monotonic()
            payloads = [line for line in lines if line.startswith("data: ")]
        assert time.monotonic() - started < 5
        assert json.loads(payloads[-1].removeprefix("data: "))["error"]["code"] == "shutting_down"


def test_engine_failure_becomes_500_and_unhealthy():
    engine = FakeEngine()

    def broken_step():
        raise RuntimeError("boom")

    engine.step = broken_step
    with running_server(make_app(engine)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model="fake", prompt="a")
        assert httpx.get(f"{url}/health").status_code == 503
        with pytest.raises(openai.APIStatusError) as after:
            client.completions.create(model="fake", prompt="a")
        assert after.value.status_code == 503


def test_metrics_report_latency_and_tokens(server, client):
    client.completions.create(model="fake", prompt="a", max_tokens=3)
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    assert "leanlm_time_to_first_token_seconds_count" in text and "leanlm_kv_blocks_used 0" in text
    generated = next(line for line in text.splitlines() if line.startswith("leanlm_generation_tokens_total"))
    assert int(generated.split()[1]) >= 3


def test_concurrent_streams_get_their_own_tokens(server):
    results = {}

    def run(letter):
        body = {"model": "fake", "prompt": letter, "max_tokens": 5, "stream": True}
        with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH) as response:
            payloads = sse_payloads(response)[:-1]
        results[letter] = "".join(json.loads(p)["choices"][0]["text"] for p in payloads)

    threads = [threading.Thread(target=run, args=(letter,)) for letter in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {x: "".join(f"<{ord(x) + i}>" for i in range(1, 6)) for x in "abc"}

"""Regression tests for what a probe of the server as an attacker and a careless client found (issue 18):
deep JSON, clients leaving before a non-streamed answer, huge echoed strings, 405/HEAD/OpenAPI, the 429
message, and browser attacks on a server without an API key (text/plain POSTs, DNS rebinding, CORS)."""

import asyncio
import json
import logging
import time

import httpx
import pytest
from server_fakes import FakeEngine, FakeLLM
from server_harness import running_server

from leanlm.server.app import build_app
from leanlm.server.async_engine import AsyncEngine
from leanlm.server.errors import QueueFull
from leanlm.server.serving import ServerSettings, _unless_disconnected

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def make_app(engine=None, **settings):
    defaults = {"model_name": "fake", "api_key": KEY, "max_queue": 2, "max_tokens_limit": 100}
    return build_app(FakeLLM(engine or FakeEngine()), ServerSettings(**{**defaults, **settings}))


@pytest.fixture(scope="module")
def server():
    with running_server(make_app(FakeEngine(step_delay_s=0.001))) as (url, _):
        yield url


@pytest.fixture(scope="module")
def keyless():
    app = make_app(FakeEngine(step_delay_s=0.001), api_key=None, allowed_origins=("https://app.example",))
    with running_server(app) as (url, _):
        yield url


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_json_is_a_400_not_a_500(server, depth):
    body = '{"model": "fake", "prompt": ' + "[" * depth + "]" * depth + "}"
    response = httpx.post(f"{server}/v1/completions", content=body, headers=AUTH)
    assert response.status_code == 400, response.text
    assert "levels deep" in response.json()["error"]["message"]


def test_moderately_nested_json_still_reaches_validation(server):
    body = {"model": "fake", "prompt": [[[[1]]]]}
    response = httpx.post(f"{server}/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


class _LeavingClient:
    """A starlette Request stand-in whose client disconnects on the second receive()."""

    def __init__(self):
        self.calls = 0

    async def receive(self):
        self.calls += 1
        if self.calls > 1:
            return {"type": "http.disconnect"}
        await asyncio.sleep(0.01)
        return {"type": "http.request", "body": b"", "more_body": False}


def test_a_client_leaving_a_non_streamed_request_gets_the_499_path_and_the_work_is_cleaned_up():
    """Regression: task.result() right after task.cancel() raised InvalidStateError instead of returning None."""
    cleaned = []

    async def work():
        try:
            await asyncio.sleep(60)
        finally:
            cleaned.append(True)

    async def main():
        return await _unless_disconnected(_LeavingClient(), work())

    assert asyncio.run(main()) is None
    assert cleaned == [True]  # cancelled and finished before the handler answered


def test_finished_work_returns_its_result():
    async def main():
        async def work():
            return 7

        return await _unless_disconnected(_LeavingClient(), work())

    assert asyncio.run(main()) == 7


def test_leaving_a_non_streamed_request_aborts_it_without_error_logs(caplog):
    engine = FakeEngine(step_delay_s=0.01)
    app = make_app(engine)
    with caplog.at_level(logging.WARNING), running_server(app) as (url, _):
        with pytest.raises(httpx.ReadTimeout):
            body = {"model": "fake", "prompt": "a", "max_tokens": 100}
            httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=0.3)

        end = time.monotonic() + 5
        while not (engine.aborted and app.state.engine.in_flight == 0):
            assert time.monotonic() < end
            time.sleep(0.01)
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR or "InvalidStateError" in r.getMessage()]
    assert problems == []


def test_a_huge_model_name_is_not_echoed_whole(server):
    name = "m" * 500_000
    response = httpx.post(f"{server}/v1/completions", json={"model": name, "prompt": "a"}, headers=AUTH)
    assert response.status_code == 404
    assert len(response.content) < 2000 and "500000 characters" in response.json()["error"]["message"]


def test_405_names_the_allowed_methods_and_head_health_works(server):
    response = httpx.get(f"{server}/v1/completions", headers=AUTH)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    head = httpx.head(f"{server}/health")
    assert head.status_code == 200 and head.content == b""


def test_openapi_json_describes_the_request_bodies(server):
    document = httpx.get(f"{server}/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    schema = document["components"]["schemas"][body["schema"]["$ref"].rsplit("/", 1)[1]]
    assert {"model", "messages", "response_format", "tools"} <= set(schema["properties"])


def test_429_message_names_the_real_limit():
    """Regression: with --max-queue 8 it said '--max-queue allows 72' (the running batch plus the queue)."""
    engine = AsyncEngine(FakeEngine(max_num_seqs=64), max_in_flight=64 + 8)
    engine.in_flight = 72

    async def submit():
        await engine.submit([[1]], [None], [None])

    with pytest.raises(QueueFull) as full:
        asyncio.run(submit())
    assert "holds at most 72 (the running batch, --max-num-seqs, plus --max-queue waiting)" in full.value.message


def test_keyless_server_refuses_cross_site_simple_posts(keyless):
    body = json.dumps({"model": "fake", "prompt": "a", "max_tokens": 1})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": content_type} if content_type else {}
        response = httpx.post(f"{keyless}/v1/completions", content=body, headers=headers)
        assert response.status_code == 415, (content_type, response.text)
    ok = httpx.post(f"{keyless}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert ok.status_code == 200


def test_keyless_server_checks_the_host_header(keyless):
    port = keyless.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
        response = httpx.get(f"{keyless}/v1/models", headers={"Host": host})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_host", host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert httpx.get(f"{keyless}/v1/models", headers={"Host": host}).status_code == 200


def test_allowed_hosts_adds_names():
    app = make_app(api_key=None, allowed_hosts=("api.internal",))
    with running_server(app) as (url, _):
        assert httpx.get(f"{url}/health", headers={"Host": "api.internal:80"}).status_code == 200
        assert httpx.get(f"{url}/health", headers={"Host": "other.internal"}).status_code == 400


def test_cors_answers_only_the_allowed_origins(keyless, server):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    allowed = httpx.options(f"{keyless}/v1/completions", headers=preflight)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(f"{keyless}/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    # off by default: no CORS headers at all
    default = httpx.get(f"{server}/v1/models", headers={**AUTH, "Origin": "https://app.example"})
    assert "access-control-allow-origin" not in default.headers

"""`leanlm serve --replicas`: two Ray Serve replicas of a tiny model behind one endpoint, on this machine. The
official openai client gets answers; prompts sharing a prefix all land on one replica (its prefix-cache hits show
it); killing a replica under load loses no request that had not started streaming, and Serve replaces it.
One Ray cluster for the module (Ray is heavy on 2 cores)."""

from __future__ import annotations

import concurrent.futures
import re
import socket
import time

import httpx
import pytest
from tiny_model import write_tiny_model

serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

import ray  # noqa: E402  (after the skip)

from leanlm.config import EngineConfig  # noqa: E402
from leanlm.server.replicas.deployment import ReplicaOptions, start_replicas, stop_replicas  # noqa: E402
from leanlm.server.serving import ServerSettings  # noqa: E402

pytestmark = pytest.mark.slow
SHARED = " ".join(f"w{i}" for i in range(10, 50))  # 40 words, ~160 characters: past the router's prefix window


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def replica_metrics(base: str) -> dict[str, dict[str, float]]:
    """replica id -> {metric sample name (labels other than replica kept): value}."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    out: dict[str, dict[str, float]] = {}
    for name, replica, rest, value in re.findall(r'^(\w+)\{replica="([^"]+)",?([^}]*)\} (\S+)$', text, re.M):
        out.setdefault(replica, {})[name + (f"{{{rest}}}" if rest else "")] = float(value)
    return out


def wait_for_replicas(base: str, count: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            metrics = replica_metrics(base)
            if len(metrics) == count:
                return metrics
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{count} replicas did not report within {timeout_s} s")


def settled_metrics(base: str) -> dict:
    """Metrics once every replica has reported what it finished so far (replicas report every second)."""
    time.sleep(2.5)
    return replica_metrics(base)


def finished(metrics: dict, replica: str) -> float:
    return sum(v for k, v in metrics.get(replica, {}).items() if k.startswith("leanlm_requests_finished_total"))


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    model = write_tiny_model(tmp_path_factory.mktemp("replicas") / "tiny", context=4096)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        llm_options = dict(
            model=str(model), dtype="float32", threads=1, engine_config=EngineConfig(kv_cache_memory=16 << 20)
        )
        options = ReplicaOptions(replicas=2, cpus_per_replica=1, max_ongoing_requests=32)
        start_replicas(llm_options, ServerSettings(model_name="tiny"), options, "127.0.0.1", port)
        base = f"http://127.0.0.1:{port}"
        wait_for_replicas(base, 2, 120)
        yield base
    finally:
        try:
            stop_replicas()
        finally:
            ray.shutdown()


def test_two_replicas_answer_the_openai_client(endpoint):
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", timeout=60, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    answer = client.completions.create(model="tiny", prompt="w1 w2 w3", max_tokens=6, temperature=0)
    assert answer.usage.completion_tokens == 6 and answer.choices[0].finish_reason == "length"
    streamed = client.completions.create(model="tiny", prompt="w1 w2 w3", max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == answer.choices[0].text
    with pytest.raises(openai.BadRequestError):  # a bad request is the replica's 400, passed through
        client.completions.create(model="tiny", prompt="w1", max_tokens=-3)


def test_prompts_sharing_a_prefix_go_to_one_replica_and_hit_its_cache(endpoint):
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", timeout=60, max_retries=0)
    before = settled_metrics(endpoint)
    for suffix in range(6):
        client.completions.create(model="tiny", prompt=f"{SHARED} w{200 + suffix}", max_tokens=2, temperature=0)
    after = settled_metrics(endpoint)
    served = {r: finished(after, r) - finished(before, r) for r in after}
    assert sorted(served.values()) == [0, 6], served  # every shared-prefix request on the same replica
    holder = max(served, key=served.get)
    hits = after[holder]["leanlm_prefix_cache_hits_total"] - before[holder].get("leanlm_prefix_cache_hits_total", 0)
    assert hits >= 5 * (40 // 16), hits  # the 5 later requests found the shared 40-token prefix's 2 full blocks

    before = after  # distinct prefixes spread: both replicas serve some of 16 (all on one: p = 2^-15)
    for first in range(16):
        client.completions.create(model="tiny", prompt=f"w{100 + first} {SHARED}", max_tokens=1, temperature=0)
    after = settled_metrics(endpoint)
    assert all(finished(after, r) > finished(before, r) for r in after), after


def test_killing_a_replica_under_load_loses_no_request_that_had_not_streamed(endpoint):
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", timeout=180, max_retries=0)
    tokens = 1500  # a few seconds per request: long enough to be killed under

    def ask(i: int):
        return client.completions.create(model="tiny", prompt=f"w{i} w{i + 1}", max_tokens=tokens, temperature=0)

    replicas = sorted(replica_metrics(endpoint))
    victim_id = replicas[0]
    victim = ray.get_actor(f"SERVE_REPLICA::leanlm#Replica#{victim_id}", namespace="serve")  # Serve's actor name
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(ask, i) for i in range(12)]
        deadline = time.monotonic() + 60
        while replica_metrics(endpoint)[victim_id]["leanlm_requests_in_flight"] == 0:  # it is answering some
            assert time.monotonic() < deadline, "the replica never got a request"
            time.sleep(0.05)
        # A non-streamed answer arrives only when its request ends: with none back yet, the requests the victim
        # reported (metrics are up to 1 s old) are still on it when it dies
        all_outstanding = not any(f.done() for f in futures)
        ray.kill(victim, no_restart=True)
        answers = [f.result(timeout=240) for f in futures]
    assert [a.usage.completion_tokens for a in answers] == [tokens] * 12  # none lost, none cut short
    text = httpx.get(f"{endpoint}/metrics", timeout=30).text
    retries = float(re.search(r"^leanlm_router_retries_total (\S+)$", text, re.M).group(1))
    assert retries > 0 or not all_outstanding  # the victim's unfinished requests were retried
    deadline = time.monotonic() + 120  # Serve starts a replacement; the dead one drops out of /metrics
    while set(metrics := replica_metrics(endpoint)) & {victim_id} or len(metrics) != 2:
        assert time.monotonic() < deadline, f"no replacement replica: {sorted(metrics)}"
        time.sleep(1)

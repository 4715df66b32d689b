"""`leanlm serve --replicas 1 --tensor-parallel-size 2`: a Ray Serve replica that is rank 0 of two, its other rank a
Ray actor on the same node, answers like one process. Its own Ray cluster (2 CPUs: the replica and its follower)."""

from __future__ import annotations

import socket

import httpx
import pytest
from tiny_model import write_tiny_model

pytest.importorskip("ray.serve")

import ray  # noqa: E402  (after the skip)

from leanlm.config import EngineConfig  # noqa: E402
from leanlm.engine.llm import LLM  # noqa: E402
from leanlm.sampling_params import SamplingParams  # noqa: E402
from leanlm.server.replicas.deployment import ReplicaOptions, start_replicas, stop_replicas  # noqa: E402
from leanlm.server.serving import ServerSettings  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = ["w1 w7 w3 w9", "w200 w17"]


def test_a_replica_of_two_ranks_answers_like_one_process(tmp_path):
    model = write_tiny_model(tmp_path / "tiny")
    expected = [
        out.text
        for out in LLM(str(model), dtype="float32", threads=1).generate(
            PROMPTS, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        )
    ]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        llm_options = dict(
            model=str(model), dtype="float32", threads=1, tensor_parallel_size=2,
            engine_config=EngineConfig(kv_cache_memory=16 << 20),
        )  # fmt: skip
        start_replicas(llm_options, ServerSettings(model_name="tiny"), ReplicaOptions(replicas=1), "127.0.0.1", port)
        texts = []
        for prompt in PROMPTS:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
            assert answer.status_code == 200, answer.text
            texts.append(answer.json()["choices"][0]["text"])
        assert texts == expected
    finally:
        try:
            stop_replicas()
        finally:
            ray.shutdown()

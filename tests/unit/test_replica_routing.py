"""The pieces of `serve --replicas` that need no Ray cluster: the routing key of a request, the consistent choice of
a replica, the merged /metrics, the deployment options, and the CLI's refusals."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray.serve")

from leanlm.cli.main import main  # noqa: E402
from leanlm.server.replicas.deployment import ReplicaOptions  # noqa: E402
from leanlm.server.replicas.metrics import merge_metrics  # noqa: E402
from leanlm.server.replicas.routing import PREFIX_CHARS, preferred_replica, prefix_key  # noqa: E402

SYSTEM = "You are a careful assistant. " * 6  # longer than the routing window


def body(**fields) -> bytes:
    return json.dumps({"model": "m", **fields}).encode()


def test_prompts_that_share_the_routing_window_share_a_key():
    assert prefix_key(body(prompt=SYSTEM + "first question")) == prefix_key(body(prompt=SYSTEM + "another one"))
    assert prefix_key(body(prompt="short a")) != prefix_key(body(prompt="short b"))
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    other = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "bye"}]
    assert prefix_key(body(messages=chat)) == prefix_key(body(messages=other)) is not None
    assert prefix_key(body(prompt=[1, 2, 3])) == prefix_key(body(prompt=[1, 2, 3]))  # token ids
    assert prefix_key(body(prompt=["x" * PREFIX_CHARS + "a", "y"])) == prefix_key(body(prompt="x" * PREFIX_CHARS))
    assert prefix_key(b"{not json") is None and prefix_key(body()) is None and prefix_key(b"[1]") is None


def test_the_choice_is_consistent_and_losing_a_replica_moves_only_its_keys():
    keys = [prefix_key(body(prompt=f"prompt {i}")) for i in range(200)]
    three = {key: preferred_replica(key, ["a", "b", "c"]) for key in keys}
    assert set(three.values()) == {"a", "b", "c"}
    assert three == {key: preferred_replica(key, ["c", "a", "b"]) for key in keys}  # order does not matter
    two = {key: preferred_replica(key, ["a", "c"]) for key in keys}
    assert all(two[key] == three[key] for key in keys if three[key] != "b")


def test_metrics_of_replicas_merge_under_one_header_with_a_replica_label():
    text = (
        "# HELP leanlm_requests_running Requests.\n# TYPE leanlm_requests_running gauge\nleanlm_requests_running 2\n"
        "# HELP leanlm_requests_finished Finished.\n# TYPE leanlm_requests_finished counter\n"
        'leanlm_requests_finished_total{reason="stop"} 5\n'
    )
    merged = merge_metrics({"r2": text.replace(" 2\n", " 7\n"), "r1": text}, ["leanlm_replicas 2"])
    lines = merged.splitlines()
    assert lines[0] == "leanlm_replicas 2"
    assert lines.count("# TYPE leanlm_requests_running gauge") == 1
    assert 'leanlm_requests_running{replica="r1"} 2' in lines and 'leanlm_requests_running{replica="r2"} 7' in lines
    assert 'leanlm_requests_finished_total{replica="r1",reason="stop"} 5' in lines
    # every sample sits under its own family's header
    type_line = lines.index("# TYPE leanlm_requests_finished counter")
    assert all(line.startswith("leanlm_requests_finished") for line in lines[type_line + 1 :])


def test_replica_counts_or_autoscaling_bounds_become_serve_options():
    fixed = ReplicaOptions(replicas=3).deployment_options()
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    scaled = ReplicaOptions(replicas=2, min_replicas=1, max_replicas=4).deployment_options()
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] | {} == {
        "min_replicas": 1, "max_replicas": 4, "initial_replicas": 2, "target_ongoing_requests": 8.0,
    }  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--replicas", "0"], "--replicas must be >= 1"),
        (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 exceeds --max-replicas 2"),
        (["--max-replicas", "0"], "--max-replicas must be >= 1"),
    ],
)
def test_serve_refuses_bad_replica_options_before_loading_anything(flags, message, capsys):
    assert main(["serve", *flags]) != 0
    assert message in capsys.readouterr().err

"""Load on `leanlm serve` (its own process, localhost): a bounded profile of benchmarks/load_server.py, 32
concurrent greedy streams with mixed prompt lengths, a quarter of them disconnecting mid-stream. Every surviving
stream must equal its single-request output, nothing may answer 5xx, and the KV blocks in use must return to
their idle count. The full run (64 streams, 20% leaving) is the script."""

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load_server.py"
CLIENTS = 32


def load_script():
    spec = importlib.util.spec_from_file_location("load_server", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def load():
    return load_script()


@pytest.fixture(scope="module")
def server(load, default_gguf_path):
    """The server process; it loads the model while the solo answers are computed, and the test waits for it."""
    process, url = load.start_server(default_gguf_path)
    yield process, url
    if not load.stop_server(process):
        pytest.fail("the server did not exit within 30 s of SIGTERM")


def test_concurrent_streams_equal_single_requests_and_free_their_blocks(load, server, default_gguf_path):
    process, url = server
    answers = load.solo_answers(str(default_gguf_path))
    load.wait_until_healthy(process, url)
    idle_blocks = load.metric(url, "leanlm_kv_blocks_used")
    result = asyncio.run(load.run_load(url, CLIENTS, 0.25, answers, seed=3, time_limit_s=150))
    assert [o.status for o in result.outcomes] == [200] * CLIENTS
    assert sum(o.disconnected for o in result.outcomes) == sum(result.leaving) == CLIENTS // 4
    assert result.mismatches == []
    assert load.wait_until_idle(url, idle_blocks), "KV blocks or requests leaked after the load"

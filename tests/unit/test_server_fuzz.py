"""A bounded run of benchmarks/fuzz_server.py's request generator against the server over a fake engine: no
request may get a 500, and the server must keep serving (the full run, on the real model, is the script)."""

import asyncio
import importlib.util
from pathlib import Path

import httpx
from server_fakes import FakeEngine, FakeLLM
from server_harness import running_server

from leanlm.server.app import build_app
from leanlm.server.serving import ServerSettings

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_server.py"


def load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_server", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzzed_requests_never_get_a_500():
    fuzzer = load_fuzzer()
    settings = ServerSettings(model_name=fuzzer.MODEL, max_tokens_limit=16, max_queue=64)
    app = build_app(FakeLLM(FakeEngine(max_num_seqs=16, context_length=4096, max_cached_tokens=4096)), settings)
    with running_server(app) as (url, _):
        result = asyncio.run(fuzzer.fuzz(url, 600, 8, seed=7))
        assert result["failures"] == [] and "500" not in result["statuses"], result
        assert {"200", "400", "415"} <= set(result["statuses"])  # valid, invalid and cross-site requests all came
        assert httpx.get(f"{url}/health").status_code == 200

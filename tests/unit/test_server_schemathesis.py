"""schemathesis against the served OpenAPI document, bounded: positive and negative cases for every operation
(completions, chat, tokenize, models, health, metrics) over the fake engine, and embeddings / rerank over tiny
random encoders served beside it. No request may get a 5xx. The full
run, on the real model, is `benchmarks/fuzz_server.py --schemathesis`."""

import pytest
from hypothesis import HealthCheck, settings
from server_fakes import FakeEngine, FakeLLM
from server_harness import running_server

from leanlm.server.app import build_app
from leanlm.server.openapi import openapi_document
from leanlm.server.serving import ServerSettings

schemathesis = pytest.importorskip("schemathesis")

MODEL = "fake"
MAX_TOKENS = 16
EMBEDDER, RERANKER = "tiny-embed", "tiny-rerank"
schema = schemathesis.openapi.from_dict(openapi_document(MODEL, MAX_TOKENS, [EMBEDDER], [RERANKER]))
schema.config.generation.update(modes=list(schemathesis.GenerationMode))


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from tiny_encoders import tiny_folder

    from leanlm.embed import CrossEncoder, Embedder
    from leanlm.server.encoders import EncoderServing

    root = tmp_path_factory.mktemp("encoders")
    encoders = EncoderServing(
        {EMBEDDER: Embedder(tiny_folder(root / "embed", "bert")[0])},
        {RERANKER: CrossEncoder(tiny_folder(root / "rerank", "bert", num_labels=1)[0])},
    )
    engine = FakeEngine(max_num_seqs=16, context_length=4096, max_cached_tokens=4096)
    settings_ = ServerSettings(model_name=MODEL, max_tokens_limit=MAX_TOKENS, max_queue=64)
    with running_server(build_app(FakeLLM(engine), settings_, encoders=encoders)) as (base, _):
        yield base


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_server_error(case, url):
    response = case.call(base_url=url, timeout=30)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)

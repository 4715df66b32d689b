"""Encoders over HTTP on tiny random models: `serve --model ENCODER` without a generator (which --model values are
encoders; the encoder-only app's routes and answers), and /openapi.json describing /v1/embeddings and /v1/rerank."""

import base64
import json

import numpy as np
import pytest
from tiny_encoders import tiny_folder

from leanlm.embed import CrossEncoder, Embedder
from leanlm.embed.loading import encoder_role
from leanlm.server.encoder_app import build_encoder_app
from leanlm.server.encoders import EmbeddingResponse, EncoderServing, RerankResponse
from leanlm.server.serving import ServerSettings

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    embedding, _ = tiny_folder(root / "tiny-embed", "bert")
    rerank, _ = tiny_folder(root / "tiny-rerank", "bert", num_labels=1)
    return embedding, rerank


@pytest.fixture(scope="module")
def client(folders):
    from fastapi.testclient import TestClient

    embedding, rerank = folders
    encoders = EncoderServing({"tiny-embed": Embedder(embedding)}, {"tiny-rerank": CrossEncoder(rerank)})
    app = build_encoder_app(encoders, ServerSettings(model_name="", api_key=None))
    with TestClient(app) as test_client:
        yield test_client, encoders


def test_encoder_role_tells_encoders_from_generators(folders, tmp_path):
    embedding, rerank = folders
    assert encoder_role("all-minilm-l6-v2") == "embedding"  # a known model: no download to decide
    assert encoder_role(str(embedding)) == "embedding"
    assert encoder_role(str(rerank)) == "rerank"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert encoder_role(str(tmp_path)) is None
    assert encoder_role(None) is None
    assert encoder_role("smollm2-135m") is None


def test_embeddings_without_a_generator_equal_the_embedder(client):
    test_client, encoders = client
    texts = ["the cat sat on the mat", "a dog"]
    response = test_client.post("/v1/embeddings", json={"model": "tiny-embed", "input": texts})
    assert response.status_code == 200, response.text
    body = EmbeddingResponse.model_validate(response.json())  # the shape /openapi.json promises
    got = np.array([item.embedding for item in body.data], dtype=np.float32)
    np.testing.assert_allclose(got, encoders.embedders["tiny-embed"].embed(texts), rtol=1e-6, atol=1e-6)
    packed = test_client.post(
        "/v1/embeddings", json={"model": "tiny-embed", "input": texts[0], "encoding_format": "base64"}
    ).json()["data"][0]["embedding"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(packed), dtype="<f4"), got[0])


def test_rerank_and_models_without_a_generator(client):
    test_client, _ = client
    response = test_client.post(
        "/v1/rerank", json={"model": "tiny-rerank", "query": "cats", "documents": ["a dog", "the cat", "it was"]}
    )
    assert response.status_code == 200, response.text
    results = RerankResponse.model_validate(response.json()).results
    assert sorted(r.index for r in results) == [0, 1, 2]
    assert [r.relevance_score for r in results] == sorted((r.relevance_score for r in results), reverse=True)
    assert {m["id"] for m in test_client.get("/v1/models").json()["data"]} == {"tiny-embed", "tiny-rerank"}
    assert test_client.get("/v1/models/tiny-embed").json()["id"] == "tiny-embed"
    missing = test_client.get("/v1/models/gpt-4")
    assert missing.status_code == 404 and "tiny-embed" in missing.json()["error"]["message"]
    assert test_client.get("/health").json() == {"status": "ok"}


def test_generation_routes_are_absent_and_bad_input_is_4xx(client):
    test_client, _ = client
    assert test_client.post("/v1/completions", json={"model": "tiny-embed", "prompt": "hi"}).status_code == 404
    wrong_model = test_client.post("/v1/embeddings", json={"model": "tiny-rerank", "input": "a"})
    assert wrong_model.status_code == 404 and "tiny-embed" in wrong_model.json()["error"]["message"]
    empty = test_client.post("/v1/embeddings", json={"model": "tiny-embed", "input": []})
    assert empty.status_code == 400 and "input" in empty.json()["error"]["message"]
    assert (
        test_client.post("/v1/embeddings", content=b"{", headers={"content-type": "application/json"}).status_code
        == 400
    )


def test_openapi_lists_only_the_encoder_routes(client):
    test_client, _ = client
    document = test_client.get("/openapi.json").json()
    assert set(document["paths"]) == {"/v1/models", "/v1/models/{model}", "/health", "/v1/embeddings", "/v1/rerank"}
    schemas = document["components"]["schemas"]
    assert schemas["EmbeddingRequest"]["properties"]["model"]["enum"] == ["tiny-embed"]
    assert schemas["RerankRequest"]["properties"]["model"]["enum"] == ["tiny-rerank"]
    answer = document["paths"]["/v1/embeddings"]["post"]["responses"]["200"]["content"]["application/json"]
    assert answer["schema"] == {"$ref": "#/components/schemas/EmbeddingResponse"}


def test_the_generator_app_documents_its_encoders(folders):
    from server_fakes import FakeEngine, FakeLLM

    from leanlm.server.app import build_app

    embedding, _ = folders
    encoders = EncoderServing({"tiny-embed": Embedder(embedding)})
    engine = FakeEngine(max_num_seqs=4, context_length=256, max_cached_tokens=256)
    app = build_app(FakeLLM(engine), ServerSettings(model_name="fake"), encoders=encoders)
    document = next(route for route in app.routes if getattr(route, "path", "") == "/openapi.json").endpoint
    import asyncio

    paths = json.loads(asyncio.run(document()).body)["paths"]
    assert {"/v1/completions", "/v1/embeddings"} <= set(paths) and "/v1/rerank" not in paths


def test_serve_cli_with_an_encoder_as_model_builds_the_encoder_app(folders, monkeypatch):
    import leanlm.server.http_server as http_server
    from leanlm.cli.main import main

    served = {}

    class CapturedServer:  # stands in for uvicorn: keeps the app instead of listening
        def __init__(self, app, host, port, log_level="info"):
            served["app"] = app

        def run(self):
            served["ran"] = True

    monkeypatch.setattr(http_server, "Server", CapturedServer)
    embedding, rerank = folders
    argv = ["serve", "--model", str(embedding), "--served-model-name", "mini", "--rerank-model", str(rerank)]
    assert main(argv) == 0 and served["ran"]
    from fastapi.testclient import TestClient

    with TestClient(served["app"]) as test_client:
        assert {m["id"] for m in test_client.get("/v1/models").json()["data"]} == {"mini", "tiny-rerank"}
        assert test_client.post("/v1/embeddings", json={"model": "mini", "input": "a cat"}).status_code == 200

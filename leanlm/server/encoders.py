"""POST /v1/embeddings (OpenAI's format) and /v1/rerank (Cohere / Jina / vLLM's) over encoder models served
beside the generator: `leanlm serve --model M --embedding-model all-minilm-l6-v2 --rerank-model FOLDER`.

The request's `model` picks the encoder. Encoder work runs on one worker thread of its own (one OpenMP team),
one request at a time, off the event loop and apart from the engine thread.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field, PlainValidator, WithJsonSchema
from starlette.responses import JSONResponse

from leanlm.server.errors import BadRequest, NotFound
from leanlm.server.protocol import STRICT, Text

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request
MAX_RERANK_DOCUMENTS = 1000


def _embedding_input(value: Any) -> list[str] | list[list[int]]:
    """A string, a list of strings, a list of token ids or a list of such lists -> a list of items."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(type(t) is int for t in value):
        value = [value]
    if not isinstance(value, list):
        raise ValueError("input must be a string, a list of strings, a list of token ids or a list of such lists")
    if not value:
        raise ValueError("input is an empty list; send at least one text")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise ValueError(f"input has {len(value)} items; at most {MAX_EMBEDDING_INPUTS} per request")
    return value


_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
INPUT_SCHEMA = {  # what _embedding_input accepts, for /openapi.json
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 64},
        _TOKENS,
        {"type": "array", "items": _TOKENS, "minItems": 1, "maxItems": 64},
    ]
}


class EmbeddingRequest(BaseModel):
    model_config = STRICT
    model: str
    input: Annotated[Any, PlainValidator(_embedding_input), WithJsonSchema(INPUT_SCHEMA)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    truncate: bool = False  # extension (TEI's name): cut texts over the model's limit instead of a 400


class RerankRequest(BaseModel):
    model: str
    query: Text = Field(min_length=1)
    documents: list[Text] = Field(min_length=1, max_length=MAX_RERANK_DOCUMENTS)
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True
    model_config = STRICT


# The answers' shapes, for /openapi.json (the routes build the same fields as plain dicts).
class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32 (encoding_format "base64")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None  # left out with return_documents: false


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class EncoderServing:
    """The encoders a server holds, by the name clients send."""

    def __init__(self, embedders: dict[str, Any] | None = None, rerankers: dict[str, Any] | None = None):
        self.embedders, self.rerankers = dict(embedders or {}), dict(rerankers or {})
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leanlm-encoder")

    @property
    def names(self) -> list[str]:
        return [*self.embedders, *self.rerankers]

    def __bool__(self) -> bool:
        return bool(self.embedders or self.rerankers)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _pick(self, table: dict[str, Any], name: str, what: str, route: str):
        if name in table:
            return table[name]
        served = ", ".join(f"'{n}'" for n in table) or "none"
        raise NotFound(
            f"The model '{name[:80]}' is not a {what} model on this server ({route} serves: {served}).",
            "model",
            "model_not_found",
        )

    async def embeddings(self, body: EmbeddingRequest) -> JSONResponse:
        embedder = self._pick(self.embedders, body.model, "embedding", "/v1/embeddings")
        if body.dimensions is not None and body.dimensions != embedder.dimension:
            raise BadRequest(
                f"Invalid value for 'dimensions': this model gives {embedder.dimension}-dimensional embeddings and "
                f"cannot shorten them (got {body.dimensions}); leave dimensions out.",
                "dimensions",
                "invalid_value",
            )
        token_ids = self._token_ids(embedder, body)
        vectors = await self._run(embedder.embed_token_ids, token_ids)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
            for i, vector in enumerate(vectors)
        ]
        tokens = sum(len(ids) for ids in token_ids)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": body.model, "usage": usage})

    def _token_ids(self, embedder, body: EmbeddingRequest) -> list[list[int]]:
        items = body.input
        if all(isinstance(item, str) for item in items):
            for i, text in enumerate(items):
                if not text:
                    raise BadRequest(
                        f"Invalid value for 'input[{i}]': an empty string.", f"input[{i}]", "invalid_value"
                    )
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise BadRequest(
                        f"Invalid value for 'input[{i}]': the text has an unpaired surrogate.", f"input[{i}]"
                    ) from None
            ids, cut = embedder.tokenize(items)
            first_cut = next((i for i, c in enumerate(cut) if c), None)
            if first_cut is not None and not body.truncate:
                raise BadRequest(
                    f"'input[{first_cut}]' is longer than this model's limit of {embedder.max_seq_length} tokens. "
                    'Shorten it, or send "truncate": true to embed its beginning.',
                    f"input[{first_cut}]",
                    "context_length_exceeded",
                )
            return ids
        limit, vocab = embedder.max_seq_length, embedder.config.vocab_size
        for i, item in enumerate(items):
            if not (isinstance(item, list) and item and all(type(t) is int for t in item)):
                raise BadRequest(
                    f"Invalid value for 'input[{i}]': mix neither strings and token lists nor empty lists.",
                    f"input[{i}]",
                    "invalid_value",
                )
            if len(item) > limit:
                raise BadRequest(
                    f"'input[{i}]' has {len(item)} tokens, more than this model's limit of {limit}.",
                    f"input[{i}]",
                    "context_length_exceeded",
                )
            if min(item) < 0 or max(item) >= vocab:
                raise BadRequest(f"Invalid value for 'input[{i}]': token ids must be in 0..{vocab - 1}.", f"input[{i}]")
        return items

    async def rerank(self, body: RerankRequest) -> JSONResponse:
        reranker = self._pick(self.rerankers, body.model, "rerank", "/v1/rerank")
        ids, _, _ = reranker.tokenize_pairs(body.query, body.documents)
        ranked = await self._run(reranker.rerank, body.query, body.documents, body.top_n)
        results = [
            {"index": index, "relevance_score": score}
            | ({"document": {"text": body.documents[index]}} if body.return_documents else {})
            for index, score in ranked
        ]
        usage = {"total_tokens": sum(len(x) for x in ids)}
        return JSONResponse(
            {"id": f"rerank-{uuid.uuid4().hex}", "model": body.model, "usage": usage, "results": results}
        )

    def cards(self, created: int) -> list[dict]:
        return [{"id": name, "object": "model", "created": created, "owned_by": "leanlm"} for name in self.names]

    def shutdown(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def _encode(vector: np.ndarray, encoding_format: str):
    if encoding_format == "base64":  # little-endian float32 bytes, as OpenAI sends them
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def add_encoder_routes(app: FastAPI, encoders: EncoderServing, dependencies: list, parse) -> None:
    """Routes for the encoders; `parse(request, Model)` is the app's body parser (errors that name the field)."""

    @app.post("/v1/embeddings", dependencies=dependencies)
    async def embeddings(request: Request) -> JSONResponse:
        return await encoders.embeddings(await parse(request, EmbeddingRequest))

    for path in ("/v1/rerank", "/rerank"):
        app.add_api_route(path, _rerank_route(encoders, parse), methods=["POST"], dependencies=dependencies)


def _rerank_route(encoders: EncoderServing, parse):
    async def rerank(request: Request) -> JSONResponse:
        return await encoders.rerank(await parse(request, RerankRequest))

    return rerank

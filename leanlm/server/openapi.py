"""The OpenAPI 3.1 description of the API, built from the pydantic request and response models.

The server parses request bodies itself (for its error messages), so FastAPI cannot see them: this document names
them explicitly, so that clients and fuzzers (schemathesis) know every route, body and status.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from leanlm.server.encoders import EmbeddingRequest, EmbeddingResponse, RerankRequest, RerankResponse
from leanlm.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)


def openapi_document(
    model_name: str | None,
    max_tokens: int = 4096,
    embedding_models: Sequence[str] = (),
    rerank_models: Sequence[str] = (),
) -> dict[str, Any]:
    """The document of a server with a generator named `model_name` (None: an encoder-only server) and the
    encoders it serves beside it (/v1/embeddings, /v1/rerank)."""
    components: dict[str, Any] = {}

    def ref(model: type[BaseModel], mode: str = "validation") -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def errors(*statuses: int) -> dict[str, Any]:
        error = {"content": {"application/json": {"schema": ref(ErrorResponse, "serialization")}}}
        return {str(status): {"description": _REASONS[status], **error} for status in statuses}

    def post(summary: str, body: type[BaseModel], answer: type[BaseModel], chunk: type[BaseModel] | None) -> dict:
        content = {"application/json": {"schema": ref(answer, "serialization")}}
        description = "the answer"
        if chunk is not None:
            content["text/event-stream"] = {"schema": ref(chunk, "serialization")}
            description += ", or with stream: true a text/event-stream of chunks"
        return {
            "post": {
                "summary": summary,
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref(body)}}},
                "responses": {
                    "200": {
                        "description": description,
                        "content": content,
                    },
                    **errors(400, 401, 404, 413, 415, 429, 500, 503),
                },
            }
        }

    def get(summary: str, answer: type[BaseModel] | None, *statuses: int, text: bool = False) -> dict:
        content = {"text/plain": {"schema": {"type": "string"}}} if text else {}
        if answer is not None:
            content = {"application/json": {"schema": ref(answer, "serialization")}}
        return {
            "get": {
                "summary": summary,
                "responses": {"200": {"description": "OK", "content": content}} | errors(*statuses),
            }
        }

    generator_paths = {
        "/v1/completions": post("Complete a prompt", CompletionRequest, CompletionResponse, CompletionResponse),
        "/v1/chat/completions": post(
            "Answer a conversation", ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk
        ),
        "/v1/models": get("The served model", ModelList, 401),
        "/v1/models/{model}": get("One model", ModelCard, 401, 404),
        "/health": get("Whether the engine runs", None, 503),
        "/metrics": get("Prometheus metrics", None, 401, text=True),
        "/tokenize": post("Token ids of a prompt or a conversation", TokenizeRequest, TokenizeResponse, None),
        "/detokenize": post("Text of token ids", DetokenizeRequest, DetokenizeResponse, None),
        "/tokenizer_info": get("The tokenizer's special tokens and chat template", TokenizerInfo, 401),
    }
    paths = {path: generator_paths[path] for path in ("/v1/models", "/v1/models/{model}", "/health")}
    if model_name is not None:
        paths = generator_paths
        _restrict_generation(components, model_name, max_tokens)
    served = [model_name] if model_name is not None else []
    served += [*embedding_models, *rerank_models]
    paths["/v1/models/{model}"]["get"]["parameters"] = [
        {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}, "example": served[0]}
    ]
    if embedding_models:
        paths["/v1/embeddings"] = post("Embed texts or token lists", EmbeddingRequest, EmbeddingResponse, None)
        components["EmbeddingRequest"]["properties"]["model"] = {"type": "string", "enum": list(embedding_models)}
    if rerank_models:
        paths["/v1/rerank"] = post("Order documents by relevance to a query", RerankRequest, RerankResponse, None)
        components["RerankRequest"]["properties"]["model"] = {"type": "string", "enum": list(rerank_models)}
    return {
        "openapi": "3.1.0",
        "info": {"title": "leanlm", "version": "1", "description": "OpenAI-compatible API of leanlm"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _restrict_generation(components: dict[str, Any], model_name: str, max_tokens: int) -> None:
    """What this server accepts, not just the types: its model's name, its max_tokens limit."""
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        properties = components[name]["properties"]
        properties["model"] = {"type": "string", "enum": [model_name]}
        for field in ("max_tokens", "max_completion_tokens"):
            if field in properties:
                least = 0 if name == "CompletionRequest" else 1  # completions: 0 with echo scores the prompt
                properties[field] = {
                    "anyOf": [{"type": "integer", "minimum": least, "maximum": max_tokens}, {"type": "null"}]
                }
    components["CompletionRequest"]["properties"]["prompt"] = {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 16},
            {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000}, "minItems": 1},
        ]
    }


_REASONS = {
    400: "invalid request (the message names the field)",
    401: "missing or wrong API key",
    404: "unknown model",
    413: "request body too large",
    415: "the body is not application/json (servers without an API key)",
    429: "too many requests in flight; retry after Retry-After",
    500: "internal error",
    503: "shutting down or engine stopped",
}

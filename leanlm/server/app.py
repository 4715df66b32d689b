"""The FastAPI application: routes, API-key check, request-size limit, and every error as an OpenAI-style body."""

from __future__ import annotations

import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from leanlm.errors import InvalidRequestError, LeanLMError, PromptTooLongError
from leanlm.server.async_engine import AsyncEngine
from leanlm.server.errors import (
    APIError,
    BadRequest,
    InternalError,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    from_validation_error,
    param_name,
)
from leanlm.server.openapi import openapi_document
from leanlm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from leanlm.server.serving import OpenAIServing, ServerSettings

logger = logging.getLogger("leanlm.server")


def build_app(llm, settings: ServerSettings, engine: AsyncEngine | None = None, encoders=None) -> FastAPI:
    """The app over a loaded `LLM` (its `engine` runs on a background thread started with the app), and the
    embedding / rerank models of `encoders` (server/encoders.py's EncoderServing) beside it."""
    if engine is None:
        running = getattr(getattr(llm.engine, "config", None), "max_num_seqs", 64)
        engine = AsyncEngine(llm.engine, max_in_flight=running + settings.max_queue)
    serving = OpenAIServing(llm, engine, settings)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.shutdown(settings.shutdown_grace_s)  # a no-op when the server already drained it

    # No /docs: /openapi.json (the API's own description, no secrets) is enough for clients and fuzzers.
    app = FastAPI(title="leanlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.allowed_origins:  # added after BodySizeLimit, so it runs first: preflights get their answer
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    hosts = allowed_hosts(settings)
    if hosts is not None:
        app.add_middleware(HostCheck, hosts=hosts)
    _add_error_handlers(app)
    authorized = [Depends(_api_key_check(settings.api_key))]
    if settings.api_key is None:  # a browser's cross-site "simple" POST (text/plain, forms) must not generate
        authorized.append(Depends(_json_content_type))
    document = openapi_document(
        settings.model_name,
        settings.max_tokens_limit,
        list(encoders.embedders) if encoders else (),
        list(encoders.rerankers) if encoders else (),
    )

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> Response:
        return JSONResponse(document)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        if not engine.healthy:
            return _error(ServiceUnavailable("The engine is not running.", code="engine_dead"))
        if not engine.accepting:
            return _error(ServiceUnavailable("The server is shutting down.", code="shutting_down"))
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> dict:
        listing = ModelList(data=[ModelCard(id=settings.model_name, created=started)]).model_dump()
        return listing | {"data": listing["data"] + (encoders.cards(started) if encoders else [])}

    @app.get("/v1/models/{name:path}", dependencies=authorized)
    async def model(name: str) -> dict:
        if encoders and name in encoders.names:
            return next(card for card in encoders.cards(started) if card["id"] == name)
        serving.check_model(name)
        return ModelCard(id=settings.model_name, created=started).model_dump()

    @app.get("/metrics", dependencies=authorized)
    async def metrics() -> Response:
        text = engine.metrics.render(engine.stats, engine.in_flight)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(request: Request) -> Response:
        return await serving.completions(await _parse(request, CompletionRequest), request)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request) -> Response:
        return await serving.chat(await _parse(request, ChatCompletionRequest), request)

    # vLLM's tokenizer endpoints: clients that count or score tokens (lm-evaluation-harness) use the server's own
    @app.post("/tokenize", dependencies=authorized)
    async def tokenize(request: Request) -> dict:
        return serving.tokenize(await _parse(request, TokenizeRequest)).model_dump()

    @app.post("/detokenize", dependencies=authorized)
    async def detokenize(request: Request) -> dict:
        return serving.detokenize(await _parse(request, DetokenizeRequest)).model_dump()

    @app.get("/tokenizer_info", dependencies=authorized)
    async def tokenizer_info() -> dict:
        return serving.tokenizer_info().model_dump()

    if encoders:
        from leanlm.server.encoders import add_encoder_routes

        add_encoder_routes(app, encoders, authorized, _parse)
    return app


MAX_JSON_DEPTH = 64  # deeper bodies are refused before validation (whose error messages recurse)


def _depth_exceeds(data, limit: int) -> bool:
    """Whether JSON data nests deeper than `limit` arrays/objects (iterative: no recursion to exhaust)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > limit:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return False


async def _parse(request: Request, model: type[BaseModel]):
    """The body as `model`, with errors that say what is wrong where (the body is parsed here, not by FastAPI,
    so that invalid UTF-8, malformed JSON and wrong types each get their own message)."""
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(
            f"The request body is not valid UTF-8 (byte {body[exc.start]:#04x} at offset {exc.start}). "
            "Send JSON encoded as UTF-8.",
            code="invalid_utf8",
        ) from None
    too_deep = BadRequest(
        f"The request body nests arrays or objects more than {MAX_JSON_DEPTH} levels deep. Flatten it.",
        code="invalid_json",
    )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"The request body is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise too_deep from None
    if not isinstance(data, dict):
        raise BadRequest(f"The request body must be a JSON object, got a {type(data).__name__}.", code="invalid_json")
    if _depth_exceeds(data, MAX_JSON_DEPTH):
        raise too_deep
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


async def _json_content_type(request: Request) -> None:
    if request.method != "POST":
        return
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(
            f"The request body must be sent as 'Content-Type: application/json', got {media_type or 'none'!r}.",
            code="unsupported_media_type",
        )


def _api_key_check(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise Unauthorized(
                "Missing or incorrect API key. Send it as 'Authorization: Bearer <key>' (the server's --api-key).",
                code="invalid_api_key",
            )

    return check


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(PromptTooLongError)
    async def prompt_too_long(request: Request, exc: PromptTooLongError) -> JSONResponse:
        return _error(BadRequest(str(exc), "prompt", "context_length_exceeded"))

    @app.exception_handler(InvalidRequestError)
    async def invalid_request(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return _error(BadRequest(str(exc)))

    @app.exception_handler(LeanLMError)
    async def leanlm_error(request: Request, exc: LeanLMError) -> JSONResponse:
        return _error(InternalError(str(exc)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = param_name(tuple(first.get("loc", ())))
        return _error(BadRequest(f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        path = request.url.path if len(request.url.path) <= 100 else request.url.path[:100] + "..."
        error = APIError(
            f"{exc.detail}: {request.method} {path}. This server answers POST /v1/completions, "
            "POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics and GET /openapi.json.",
            code=str(exc.status_code),
            headers=exc.headers,  # 405 names the allowed methods in Allow
        )
        error.status = exc.status_code
        return _error(error)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unexpected error on %s %s", request.method, request.url.path)
        return _error(InternalError(f"Internal server error ({type(exc).__name__}). The server keeps running."))


def allowed_hosts(settings: ServerSettings) -> frozenset[str] | None:
    """The Host names the server answers (None: any). Without an API key, a browser page that rebinds its own DNS
    name to this address could read the answers; checking Host stops that. Bound to every interface, the
    server cannot know its names: it answers any unless --allowed-hosts names them."""
    if "*" in settings.allowed_hosts or (settings.api_key is not None and not settings.allowed_hosts):
        return None
    if settings.bind_host in ("0.0.0.0", "::", "") and not settings.allowed_hosts:
        return None
    bound = settings.bind_host.lower()
    bound = f"[{bound}]" if ":" in bound else bound
    return frozenset({"localhost", "127.0.0.1", "[::1]", bound, *settings.allowed_hosts})


class HostCheck:
    """400 for a request whose Host header (port aside) is not one of `hosts`."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str]):
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
        name = host[: host.find("]") + 1] if host.startswith("[") else host.rsplit(":", 1)[0]  # the port aside
        if name not in self.hosts:
            shown = host if len(host) <= 100 else host[:100] + "..."
            error = BadRequest(
                f"This server does not answer for the host {shown!r} (it answers {', '.join(sorted(self.hosts))}). "
                "Start it with --allowed-hosts NAME to add one.",
                code="invalid_host",
            )
            return await _error(error)(scope, receive, send)
        await self.app(scope, receive, send)


class BodySizeLimit:
    """413 for request bodies over `max_bytes`, checked on Content-Length and again while the body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = PayloadTooLarge(
            f"The request body is larger than this server accepts ({self.max_bytes} bytes; "
            "--max-request-bytes sets it). Send a shorter prompt.",
            code="request_too_large",
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(too_large)(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)


# Shared with the speech app (server/speech_app.py): the same error bodies and API-key check.
add_error_handlers = _add_error_handlers
api_key_check = _api_key_check
# And with the encoder-only app (server/encoder_app.py): the body parser and the JSON content-type check.
parse_body = _parse
json_content_type = _json_content_type

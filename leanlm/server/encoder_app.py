"""A server with encoders only (no generator), as vLLM serves an embedding model on its own:
`leanlm serve --model all-minilm-l6-v2` gives POST /v1/embeddings, plus /v1/models, /health and /openapi.json
(and /v1/rerank for a cross-encoder given with --rerank-model, or as --model when it is one).
"""

from __future__ import annotations

import time

from fastapi import Depends, FastAPI
from starlette.responses import JSONResponse, Response

from leanlm.server.app import BodySizeLimit, add_error_handlers, api_key_check, json_content_type, parse_body
from leanlm.server.encoders import EncoderServing, add_encoder_routes
from leanlm.server.errors import NotFound, ServiceUnavailable
from leanlm.server.openapi import openapi_document
from leanlm.server.serving import ServerSettings


class EncoderDrain:
    """What the HTTP server drains on shutdown (`app.state.engine`): requests get 503 from then on."""

    def __init__(self, encoders: EncoderServing):
        self.encoders, self.accepting = encoders, True

    async def shutdown(self, grace_s: float) -> None:
        self.accepting = False
        self.encoders.shutdown()


def build_encoder_app(encoders: EncoderServing, settings: ServerSettings) -> FastAPI:
    if not encoders:
        raise ValueError("an encoder-only server needs at least one embedding or rerank model")
    drain = EncoderDrain(encoders)
    started = int(time.time())
    app = FastAPI(title="leanlm encoders", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.settings = drain, settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    add_error_handlers(app)
    authorized = [Depends(api_key_check(settings.api_key))]
    if settings.api_key is None:  # as the generator's app: no cross-site "simple" POSTs
        authorized.append(Depends(json_content_type))

    async def accepting() -> None:
        if not drain.accepting:
            raise ServiceUnavailable("The server is shutting down.", code="shutting_down")

    document = openapi_document(None, embedding_models=list(encoders.embedders), rerank_models=list(encoders.rerankers))

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> Response:
        return JSONResponse(document)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        if not drain.accepting:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> dict:
        return {"object": "list", "data": encoders.cards(started)}

    @app.get("/v1/models/{name:path}", dependencies=authorized)
    async def model(name: str) -> dict:
        card = next((card for card in encoders.cards(started) if card["id"] == name), None)
        if card is None:
            served = ", ".join(f"'{n}'" for n in encoders.names)
            raise NotFound(f"The model '{name[:80]}' does not exist (served: {served}).", "model", "model_not_found")
        return card

    add_encoder_routes(app, encoders, [*authorized, Depends(accepting)], parse_body)
    return app

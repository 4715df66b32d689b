"""uvicorn, with a shutdown that drains the engine first so that no connection waits forever."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI


class Server(uvicorn.Server):
    """On shutdown (Ctrl-C, SIGTERM, `should_exit`): new requests get 503 while running ones have
    `settings.shutdown_grace_s` to finish; the rest are stopped and their clients told, then uvicorn closes."""

    def __init__(self, app: FastAPI, host: str, port: int, log_level: str = "info"):
        self.app = app
        grace = app.state.settings.shutdown_grace_s
        super().__init__(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level=log_level,
                lifespan="on",
                timeout_graceful_shutdown=int(grace) + 5,  # a last resort; the engine drain ends streams first
                timeout_keep_alive=5,
            )
        )

    async def shutdown(self, sockets=None) -> None:
        await self.app.state.engine.shutdown(self.app.state.settings.shutdown_grace_s)
        await super().shutdown(sockets)

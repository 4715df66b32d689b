"""Run one HTTP request through an ASGI app (the ordinary leanlm app, server/app.py) inside the process, and yield
what the app sends: first {"status", "headers"}, then the body in chunks. Stopping the iteration tells the app the
client went away (so its request is aborted and frees its KV blocks)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


async def call_app(
    app, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes
) -> AsyncIterator[dict | bytes]:
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
    }
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                raw = message.get("headers", [])
                yield {"status": message["status"], "headers": [(k.decode(), v.decode()) for k, v in raw]}
            elif message["type"] == "http.response.body" and message.get("body"):
                yield bytes(message["body"])
        task.result()  # an exception in the app surfaces here
    finally:
        if not task.done():
            disconnected.set()
            await asyncio.wait([task], timeout=5)

"""Server-sent events as OpenAI streams them: `data: {json}` per chunk, then `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def event(payload: BaseModel | dict) -> bytes:
    if isinstance(payload, BaseModel):
        return b"data: " + payload.model_dump_json().encode() + b"\n\n"
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """A stream that ends (and closes its generator, whose `finally` aborts the request) as soon as the client
    disconnects: also while no token has been sent yet, and whichever ASGI spec version the server speaks."""

    def __init__(self, events: AsyncIterator[bytes]):
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the connection broke while sending
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()

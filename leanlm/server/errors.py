"""Errors the server answers with, as OpenAI-style bodies: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class APIError(Exception):
    """An error answered to the client with an HTTP status and an OpenAI-style body."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(APIError):
    status = 400


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"


class NotFound(APIError):
    status = 404


class MethodNotAllowed(APIError):
    status = 405


class PayloadTooLarge(APIError):
    status = 413


class UnsupportedMediaType(APIError):
    status = 415


class QueueFull(APIError):
    status = 429
    type = "rate_limit_error"


class ServiceUnavailable(APIError):
    status = 503
    type = "service_unavailable"


class InternalError(APIError):
    status = 500
    type = "server_error"


def from_validation_error(exc: ValidationError) -> BadRequest:
    """The first problem pydantic found, as one message that names the field (OpenAI style: `messages[0].role`)."""
    error = exc.errors(include_url=False)[0]
    param = param_name(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return BadRequest(f"Unrecognized request argument supplied: {param}. Remove it.", param, "unknown_parameter")
    if kind == "missing":
        return BadRequest(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    got = _short_repr(error.get("input"))
    message = error["msg"].removeprefix("Value error, ")
    where = f"'{param}'" if param else "the request body"
    return BadRequest(f"Invalid value for {where}: {message} (got {got}).", param, "invalid_value")


def param_name(loc: tuple[Any, ...]) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

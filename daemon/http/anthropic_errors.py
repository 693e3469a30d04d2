"""Anthropic's Messages API as llmd serves it: its routes, and error bodies in Anthropic's shape
(`{"type": "error", "error": {"type": ..., "message": ...}}`), so that the official clients raise
the matching exception (`NotFoundError`, `AuthenticationError`, ...) with llmd's message."""

from __future__ import annotations

import json

from starlette.responses import JSONResponse, Response

from llmd.daemon.http.openai_errors import error_message
from llmd.drivers.base import ANTHROPIC_COUNT_TOKENS, ANTHROPIC_MESSAGES

ANTHROPIC_ROUTES = (ANTHROPIC_MESSAGES, ANTHROPIC_COUNT_TOKENS)

# Anthropic's error types by HTTP status; any other 4xx is an invalid request, any other 5xx an
# API error. llmd's 503 (no room for the model, its engine not starting) is "overloaded": the
# clients retry it, as they retry Anthropic's own overloaded errors.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's name for an error of HTTP `status`."""
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_error(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error in Anthropic's shape. It takes the arguments of `openai_errors.error_response`, so
    code shared by both APIs takes either; Anthropic's shape has no place for `code` or `param`."""
    body = {"type": "error", "error": {"type": error_type(status), "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def stream_error(status: int, message: str) -> bytes:
    """An `error` event, for a failure after a streamed reply has begun."""
    body = json.dumps({"type": "error", "error": {"type": error_type(status), "message": message}})
    return f"event: error\ndata: {body}\n\n".encode()


def is_anthropic_path(path: str) -> bool:
    """Whether a request for `path` is meant for Anthropic's API, so that its errors (a missing
    API key too) come back in Anthropic's shape."""
    return path in ANTHROPIC_ROUTES


def is_anthropic_error(body: bytes) -> bool:
    """Whether an error reply's body is in Anthropic's shape already."""
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("type") == "error" and isinstance(payload.get("error"), dict)


def reshaped_error(status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    """An error reply (an engine's, or llmd's in OpenAI's shape) in Anthropic's shape, with
    its message; a body in Anthropic's shape already is kept as it is."""
    if is_anthropic_error(body):
        return Response(body, status_code=status, media_type="application/json", headers=headers)
    return anthropic_error(status, error_message(status, body), headers=headers)

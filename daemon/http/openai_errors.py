"""OpenAI's API as llmd serves it: its routes, and error bodies shaped so SDK clients surface
llmd's message unchanged."""

from __future__ import annotations

import json

from starlette.responses import JSONResponse

from llmd.daemon.errors import LlmdError
from llmd.daemon.http.error_status import status_of

# The routes whose request body names a model: each request goes to that model's engine.
MODEL_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MODELS_LIST_ROUTE = "/v1/models"

# Nginx's code for "client closed request": the status of a reply nobody will receive.
CLIENT_GONE = 499

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
    502: "upstream_error",
    503: "service_unavailable",
}


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def llmd_error_response(error: LlmdError) -> JSONResponse:
    """An error that kept a request from its engine (a full queue, no room, an engine that
    would not start), in OpenAI's shape with the status and headers `status_of` gives it."""
    meaning = status_of(error)
    param = "model" if meaning.code == "model_not_found" else None
    return error_response(meaning.status, str(error), code=meaning.code, param=param, headers=meaning.headers)


def error_message(status: int, body: bytes, *, unstated: str | None = None) -> str:
    """The message of an error reply from llmd or an engine: `{"error": "..."}` (management API)
    or `{"error": {"message": "..."}}` (OpenAI's shape, the proxy); never raises. A body in
    neither shape gives `unstated` (by default "HTTP <status>") and the start of its text."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    heading = f"HTTP {status}" if unstated is None else unstated
    text = body.decode(errors="replace").strip()[:300]
    return f"{heading}: {text}" if text else heading

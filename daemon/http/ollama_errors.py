"""Ollama's API as llmd serves it: its routes, and its error bodies (`{"error": "..."}`), which
the official clients raise as `ResponseError` with the message unchanged."""

from __future__ import annotations

from starlette.responses import JSONResponse

# Every path of Ollama's API that llmd answers (the one with a digest in it aside).
CHAT_ROUTE = "/api/chat"
GENERATE_ROUTE = "/api/generate"
EMBED_ROUTE = "/api/embed"
EMBEDDINGS_ROUTE = "/api/embeddings"  # the older, one-prompt form of /api/embed
OLLAMA_ROUTES = (
    CHAT_ROUTE,
    GENERATE_ROUTE,
    EMBED_ROUTE,
    EMBEDDINGS_ROUTE,
    "/api/tags",
    "/api/ps",
    "/api/show",
    "/api/version",
    "/api/pull",
    "/api/delete",
    "/api/copy",
    "/api/create",
    "/api/push",
)
OLLAMA_PREFIX = "/api/"
# Ollama answers `GET /` with this text; clients probe it to see that a server is there.
ROOT_ROUTE = "/"
ROOT_TEXT = "Ollama is running"

NDJSON = "application/x-ndjson"


def ollama_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in Ollama's shape."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def is_ollama_path(path: str) -> bool:
    """Whether a request for `path` is meant for Ollama's API, so that its errors (a wrong path
    or method too) come back in Ollama's shape."""
    return path.startswith(OLLAMA_PREFIX)

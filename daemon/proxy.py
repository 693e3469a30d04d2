"""The OpenAI-compatible front door: route by `model`, start the engine on demand, stream the reply.

The request body is forwarded byte for byte; it is parsed only to read `model`. A streamed
reply is passed on chunk by chunk as the engine produces it. When the client goes away, the
upstream request is closed, which makes the engine stop generating.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .errors import LlmdError, UnknownModelError
from .manager import Manager
from .openai_errors import error_response

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024
# Headers that describe one hop, or that upstream must compute itself.
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length",
     "proxy-authorization", "proxy-connection", "authorization"}
)


def _forward_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.decode("latin-1").lower() not in _HOP_HEADERS]


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadRequest(413, f"request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadRequest(413, f"request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_model(body: bytes, content_type: str | None) -> str:
    """The `model` of an OpenAI request body, or BadRequest saying what is wrong with it."""
    if content_type is not None and "json" not in content_type.split(";")[0].lower():
        raise BadRequest(415, f"Content-Type must be application/json, not {content_type!r}")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, "request body must be a JSON object")
    model = payload.get("model")
    if model is None:
        raise BadRequest(400, "request body has no 'model' field; name one of GET /v1/models", "model")
    if not isinstance(model, str) or not model:
        raise BadRequest(400, "'model' must be a non-empty string", "model")
    return model


class RelayResponse(StreamingResponse):
    """Streams an engine's reply as it arrives. Whatever ends the response (done, client gone,
    engine gone), the upstream request is closed and the model released exactly once."""

    def __init__(self, upstream: httpx.Response, on_close: Callable[[], None], name: str, headers: dict[str, str]) -> None:
        super().__init__(self._chunks(upstream, name), status_code=upstream.status_code, headers=headers)
        self._upstream = upstream
        self._on_close = on_close

    @staticmethod
    async def _chunks(upstream: httpx.Response, name: str) -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            log.warning("stream from %s broke off: %r", name, exc)
            message = json.dumps({"error": {"message": f"engine for {name!r} broke off the stream", "type": "upstream_error"}})
            yield f"data: {message}\n\n".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._upstream.aclose()
            self._on_close()


class Proxy:
    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        # One pooled keep-alive client for all engines; generation may take minutes, so no read timeout.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def forward(self, request: Request) -> Response:
        try:
            body = await _read_body(request)
            model = parse_model(body, request.headers.get("content-type"))
            profile = self.manager.resolve(model)
        except BadRequest as exc:
            return error_response(exc.status, exc.message, param=exc.param)
        except UnknownModelError as exc:
            return error_response(404, str(exc), code="model_not_found", param="model")

        try:
            inst = await self.manager.acquire(profile.name)
        except LlmdError as exc:
            return error_response(503, str(exc), code="engine_unavailable")
        try:
            upstream_request = self.client.build_request(
                request.method,
                inst.base_url + request.url.path,
                content=body,
                headers=_forward_headers(request.headers.raw),
            )
            upstream = await self.client.send(upstream_request, stream=True)
        except BaseException as exc:
            self.manager.release(inst)
            if isinstance(exc, httpx.HTTPError):
                return error_response(502, f"engine for {profile.name!r} did not answer: {exc!r}", code="engine_error")
            raise

        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return RelayResponse(upstream, lambda: self.manager.release(inst), profile.name, headers)
        try:
            content = await upstream.aread()
        except httpx.HTTPError as exc:
            return error_response(502, f"engine for {profile.name!r} broke off its reply: {exc!r}", code="engine_error")
        finally:
            await upstream.aclose()
            self.manager.release(inst)
        return Response(content, status_code=upstream.status_code, headers=headers)

    async def list_models(self, request: Request) -> Response:
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "llmd"}
            for name in sorted(self.manager.profiles.profiles)
        ]
        return JSONResponse({"object": "list", "data": data})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(404, f"no route {request.method} {request.url.path}; llmd serves /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models")
    return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")


def build_proxy_app(proxy: Proxy) -> Starlette:
    routes = [
        Route("/v1/chat/completions", proxy.forward, methods=["POST"]),
        Route("/v1/completions", proxy.forward, methods=["POST"]),
        Route("/v1/embeddings", proxy.forward, methods=["POST"]),
        Route("/v1/models", proxy.list_models, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})

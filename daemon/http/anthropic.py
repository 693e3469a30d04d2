"""Anthropic's Messages API on the proxy listener: `POST /v1/messages` and
`POST /v1/messages/count_tokens`, so that Anthropic's clients (the official SDKs, Claude Code)
work against llmd unchanged.

A request goes to the engine as it came when the engine serves the route itself (its driver's
`native_routes`: llama-server and vLLM do). For other engines, a Messages request is translated
into a chat completions request and the engine's reply back into a message, streamed or whole
(anthropic_translate.py); counting tokens needs the engine's own route. Errors, llmd's and the
engine's, come back in Anthropic's shape (anthropic_errors.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from llmd.daemon.http.anthropic_errors import (
    ANTHROPIC_ROUTES,
    anthropic_error,
    is_anthropic_path,
    reshaped_error,
    stream_error,
)
from llmd.daemon.http.anthropic_translate import (
    SseReader,
    StreamTranslator,
    TranslationError,
    message_start,
    to_anthropic_message,
    to_openai_request,
)
from llmd.daemon.http.engine_routes import (
    JSON_HEADERS,
    EngineReply,
    EngineRouteEndpoint,
    ModelRequest,
    Refused,
    call_engine,
    forwarded_headers,
    route_not_served,
    serves_natively,
)
from llmd.daemon.http.metrics import engine_figures
from llmd.daemon.http.proxy import ClientApi, Proxy, stream_while_connected
from llmd.daemon.http.upstream import UpstreamError
from llmd.drivers.base import ANTHROPIC_COUNT_TOKENS

log = logging.getLogger(__name__)

CHAT_ROUTE = "/v1/chat/completions"
_MESSAGE_START = b"event: message_start"
# How an engine's Anthropic stream may open: with its message, or with an error.
_OPENINGS = (_MESSAGE_START, b"event: error")
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class AnthropicEndpoint(EngineRouteEndpoint):
    """The ASGI endpoint of Anthropic's routes; it answers its own failures, in Anthropic's shape."""

    error = staticmethod(anthropic_error)

    def work(self, scope: Scope, request: ModelRequest) -> Callable[[], Awaitable[Response]]:
        path = scope["path"]
        if serves_natively(self.proxy, request.engine, path):
            return partial(self._native, scope, request)
        if path == ANTHROPIC_COUNT_TOKENS:
            raise Refused(route_not_served(anthropic_error, request, path, "a reply's `usage` counts the tokens of its request"))
        return self._translation(scope, request)

    async def _native(self, scope: Scope, request: ModelRequest) -> Response:
        """The request as it came, to an engine that serves the route itself."""
        reply = await call_engine(self.proxy, request.model, scope["path"], forwarded_headers(scope), request.body, anthropic_error)
        if reply.streams and reply.status < 400:
            return NativeStream(reply)
        content = await reply.whole(anthropic_error)
        if reply.status >= 400:
            return reshaped_error(reply.status, content)
        return reply.relayed(content)

    def _translation(self, scope: Scope, request: ModelRequest) -> Callable[[], Awaitable[Response]]:
        """The work of a Messages request translated to the engine's chat completions; the
        request is translated at once, so a request llmd cannot translate loads no model."""
        try:
            translated = to_openai_request(request.payload, request.model)
        except TranslationError as exc:
            raise Refused(anthropic_error(400, str(exc), param=exc.param)) from None
        body = json.dumps(translated).encode()

        async def work() -> Response:
            reply = await call_engine(self.proxy, request.model, CHAT_ROUTE, JSON_HEADERS, body, anthropic_error)
            if reply.streams and reply.status < 400:
                return TranslatedStream(reply, StreamTranslator(request.model))
            content = await reply.whole(anthropic_error)
            if reply.status >= 400:
                return reshaped_error(reply.status, content)
            try:
                answer = json.loads(content)
                if not isinstance(answer, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                return anthropic_error(502, f"engine for {request.model!r} answered with no chat completion: {exc}")
            # The reply llmd sends is no longer the engine's: hand its own figures to the metrics.
            engine_figures(scope, answer.get("timings"), answer.get("usage"))
            return JSONResponse(to_anthropic_message(answer, request.model))

        return work


class _EngineStream(Response):
    """A streamed reply from the engine, sent on as Anthropic's stream events as it arrives.
    Whatever ends it (done, client gone, engine gone), the engine's reply is closed and the
    model released exactly once."""

    def __init__(self, reply: EngineReply) -> None:
        self.status_code = 200
        self.raw_headers = list(_SSE_HEADERS)
        self.background = None
        self._reply = reply

    async def _relay(self, scope: Scope, send: Send) -> None:
        raise NotImplementedError

    def _broke_off(self, exc: UpstreamError) -> bytes:
        log.warning("stream from %s broke off: %r", self._reply.model, exc)
        self._reply.broken()
        return stream_error(502, f"engine for {self._reply.model!r} broke off the stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # `done` never waits: a cancelled request still closes the engine's reply.
        await stream_while_connected(scope, receive, lambda: self._relay(scope, send), self._reply.done)


class NativeStream(_EngineStream):
    """The engine's own Anthropic stream, passed on as it comes, but for one repair: llama-server
    leaves out `message_start` when its first token is part of a character (its text then
    starts a token later), and clients cannot read a stream without it. A stream that does not
    open with one gets one."""

    async def _relay(self, scope: Scope, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        head: bytes | None = b""  # the stream's first bytes, held until they show how it opens
        try:
            async for piece in self._reply.upstream:
                if head is not None:
                    head += piece
                    if len(head) < len(_MESSAGE_START) and b"\n\n" not in head:
                        continue
                    piece, head = self._opened(head), None
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            ending = self._opened(head) if head else b""
        except UpstreamError as exc:
            ending = self._broke_off(exc)
        await send({"type": "http.response.body", "body": ending, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _opened(self, head: bytes) -> bytes:
        return head if head.lstrip().startswith(_OPENINGS) else message_start(self._reply.model) + head


class TranslatedStream(_EngineStream):
    """A streamed chat completion from the engine, translated into Anthropic's events."""

    def __init__(self, reply: EngineReply, translator: StreamTranslator) -> None:
        super().__init__(reply)
        self._translator = translator

    async def _relay(self, scope: Scope, send: Send) -> None:
        translator, reply = self._translator, self._reply
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": translator.start(), "more_body": True})
        reader = SseReader()
        ending = b""
        try:
            async for piece in reply.upstream:
                events = []
                for data in reader.feed(piece):
                    chunk = _chunk(data)
                    if chunk is None:
                        continue
                    if "error" in chunk and "choices" not in chunk:  # the engine's own error event
                        ending = stream_error(500, f"engine for {reply.model!r} failed mid-reply: {_error_text(chunk)}")
                        break
                    events.append(translator.chunk(chunk))
                if events:
                    await send({"type": "http.response.body", "body": b"".join(events), "more_body": True})
                if ending:
                    break
        except UpstreamError as exc:
            ending = self._broke_off(exc)
        if not ending:
            ending = translator.finish()
            # The events sent are no longer the engine's: hand its own figures to the metrics.
            engine_figures(scope, None, translator.usage)
        await send({"type": "http.response.body", "body": ending, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _chunk(data: str) -> dict[str, Any] | None:
    """One chat completion chunk, or None for the end marker and anything that is not one."""
    if data.strip() == "[DONE]":
        return None
    try:
        chunk = json.loads(data)
    except ValueError:
        return None
    return chunk if isinstance(chunk, dict) else None


def _error_text(chunk: dict[str, Any]) -> str:
    error = chunk.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return str(error)


def anthropic_api(proxy: Proxy) -> ClientApi:
    """Anthropic's Messages API, for `build_proxy_app`."""
    endpoint = AnthropicEndpoint(proxy)
    return ClientApi(
        endpoints={route: endpoint for route in ANTHROPIC_ROUTES},
        owns=is_anthropic_path,
        unauthorized=lambda message: anthropic_error(401, message),
        error=lambda status, message, headers: anthropic_error(status, message, headers=headers),
    )


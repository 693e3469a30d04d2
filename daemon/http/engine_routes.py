"""The plumbing of the proxy's routes beside OpenAI's chat, completions and embeddings
(Anthropic's Messages, OpenAI's Responses): read a request, find its model and whether the
model's engine serves the route itself (its driver's `native_routes`), and exchange a request
with the engine, every refusal in the route's own API shape (`ErrorReply`).

It builds on proxy.py's request handling (reading the body under its deadline, parsing it,
relaying a reply), which does the same for OpenAI's routes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from llmd.daemon.errors import LlmdError, UnknownModelError
from llmd.daemon.http.error_status import failure_message, status_of
from llmd.daemon.http.metrics import ASKED_MODEL_KEY, name_model
from llmd.daemon.http.openai_errors import CLIENT_GONE
from llmd.daemon.http.proxy import (
    BadRequest,
    Proxy,
    RelayResponse,
    _ClientGone,
    _forward_headers,
    _Relayed,
    _unless_disconnected,
    parse_request,
    relayed_headers,
)
from llmd.daemon.http.upstream import Headers, UpstreamError, find_header
from llmd.daemon.http.upstream import Response as UpstreamResponse
from llmd.drivers.base import native_routes

log = logging.getLogger(__name__)


class ErrorReply(Protocol):
    """An API's error reply: `openai_errors.error_response`, `anthropic_errors.anthropic_error`."""

    def __call__(
        self, status: int, message: str, *, code: str | None = None, param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response: ...


class Refused(Exception):
    """The request is answered with `reply` (an error, or 499 for a client that left) instead of the engine's."""

    def __init__(self, reply: Response) -> None:
        super().__init__(reply.status_code)
        self.reply = reply


@dataclass(frozen=True)
class ModelRequest:
    """A request's parsed body and the model it reached."""

    payload: dict[str, Any]
    # The body to forward as it came, but for `model`, which names the profile (engines such as
    # fastllm only know the profile's name, not its aliases).
    body: bytes
    model: str  # the profile's name
    engine: str  # the profile's engine, its driver's name


async def read_model_request(proxy: Proxy, scope: Scope, receive: Receive, error: ErrorReply) -> ModelRequest:
    """The request's body, parsed, and its model resolved; Refused with `error`'s reply when the body
    is too large, late, not a JSON object with a `model`, or names no profile."""
    try:
        # Read before a model is acquired: a slow client holds a connection, never a model.
        body = await proxy.read_body(scope, receive)
        if body is None:  # the client left while sending it
            raise Refused(Response(status_code=CLIENT_GONE))
        content_type = find_header(scope["headers"], b"content-type")
        asked, payload = parse_request(body, None if content_type is None else content_type.decode("latin-1"))
        scope[ASKED_MODEL_KEY] = asked  # for the request log, should the name match no profile
        profile = proxy.manager.resolve(asked)
    except BadRequest as exc:
        raise Refused(error(exc.status, exc.message, param=exc.param, headers=exc.headers)) from None
    except UnknownModelError as exc:
        raise Refused(error(404, str(exc), code="model_not_found", param="model")) from None
    name_model(scope, profile.name)  # for the metrics, which label the request by the model it reached
    if asked != profile.name:
        body = json.dumps({**payload, "model": profile.name}).encode()
    return ModelRequest(payload=payload, body=body, model=profile.name, engine=profile.engine)


def serves_natively(proxy: Proxy, engine: str, path: str) -> bool:
    """Whether `engine` serves `path` itself, as its driver declares (`native_routes`)."""
    driver = proxy.manager.drivers.get(engine)
    return driver is not None and path in native_routes(driver)


def forwarded_headers(scope: Scope) -> Headers:
    """The client's end-to-end headers, for a request passed to the engine as it came."""
    return _forward_headers(scope["headers"])


# The headers of a request llmd wrote itself (a translation).
JSON_HEADERS: Headers = [(b"content-type", b"application/json"), (b"accept", b"application/json, text/event-stream")]


@dataclass
class EngineReply:
    """The reply of the engine of `model` to one request, its head read, the model held
    until `done()`, which must be called exactly once (by `whole()`, or by a streaming reply)."""

    proxy: Proxy
    inst: Any
    upstream: UpstreamResponse
    model: str

    @property
    def status(self) -> int:
        return self.upstream.status

    @property
    def streams(self) -> bool:
        return (self.upstream.header(b"content-type") or b"").startswith(b"text/event-stream")

    def done(self) -> None:
        """Close the engine's reply and release the model."""
        try:
            self.upstream.close()
        finally:
            self.proxy.manager.release(self.inst)

    def broken(self) -> None:
        """The engine broke off its reply: it may be dying, so have it looked at at once."""
        self.proxy.manager.engine_failed(self.inst)

    async def whole(self, error: ErrorReply) -> bytes:
        """The whole body; the model is released. Refused (502) if the engine breaks it off."""
        try:
            return await self.upstream.read()
        except UpstreamError as exc:
            self.broken()
            raise Refused(error(502, f"engine for {self.model!r} broke off its reply: {exc}", code="engine_error")) from None
        finally:
            self.done()

    def relayed(self, content: bytes) -> Response:
        """`content`, the whole body, as the engine sent it."""
        return _Relayed(content, self.status, relayed_headers(self.upstream.headers))

    def relay_stream(self) -> Response:
        """The engine's stream, passed on piece by piece as it arrives."""
        return RelayResponse(
            self.upstream, self.model, relayed_headers(self.upstream.headers), on_close=self.done, on_broken=self.broken
        )


async def call_engine(proxy: Proxy, model: str, path: str, headers: Headers, body: bytes, error: ErrorReply) -> EngineReply:
    """Acquire `model` (starting it if need be), POST `body` to its engine at `path`, and return
    the reply once its head has arrived; Refused with `error`'s reply when the model cannot be
    had or its engine does not answer."""
    try:
        inst = await proxy.manager.acquire(model)
    except LlmdError as exc:  # a full queue (429), no room (503), an engine that would not start (503)
        meaning = status_of(exc)
        param = "model" if meaning.code == "model_not_found" else None
        raise Refused(error(meaning.status, str(exc), code=meaning.code, param=param, headers=meaning.headers)) from None
    try:
        assert inst.client is not None  # a ready instance always has one
        upstream = await inst.client.request("POST", path, headers, body)
    except BaseException as exc:
        proxy.manager.release(inst)
        if isinstance(exc, UpstreamError):
            proxy.manager.engine_failed(inst)
            raise Refused(error(502, f"engine for {model!r} did not answer: {exc}", code="engine_error")) from None
        raise
    return EngineReply(proxy, inst, upstream, model)


def route_not_served(error: ErrorReply, request: ModelRequest, route: str, instead: str) -> Response:
    """The 404 for a route the model's engine does not serve (and llmd cannot translate)."""
    message = (
        f"model {request.model!r} runs on the {request.engine} engine, which does not serve POST {route}; {instead}"
    )
    return error(404, message, code="route_not_served")



class EngineRouteEndpoint:
    """The ASGI endpoint of one API's routes to the engines. Like the proxy's own, it is reached
    before Starlette's router and middleware, so it answers its own failures, in its API's shape
    (`error`). A subclass says what answering a request takes (`work`)."""

    error: ErrorReply

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self.answer(scope, receive)
        except Exception:
            log.exception("llmd failed on %s %s", scope["method"], scope["path"])
            response = self.error(500, failure_message(scope["method"], scope["path"]))
        await response(scope, receive, send)

    async def answer(self, scope: Scope, receive: Receive) -> Response:
        try:
            request = await read_model_request(self.proxy, scope, receive, self.error)
            return await _unless_disconnected(scope, receive, self.work(scope, request))
        except Refused as refusal:
            return refusal.reply
        except _ClientGone:
            return Response(status_code=CLIENT_GONE)

    def work(self, scope: Scope, request: ModelRequest) -> Callable[[], Awaitable[Response]]:
        """The work of answering `request`, cancelled if the client leaves; Refused for a request
        answered at once (one the model's engine cannot serve)."""
        raise NotImplementedError

"""The OpenAI-compatible front door: route by `model`, start the engine on demand, stream the reply.

The request body is forwarded byte for byte; it is parsed only to read `model`. A streamed
reply is passed on chunk by chunk as the engine produces it. When the client goes away, the
upstream request is closed, which makes the engine stop generating. The hop to the engine goes
through `upstream.Pool`, the instance's own keep-alive connections.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from llmd.daemon.http.client_link import BODY_TAP_KEY, client_link
from llmd.daemon.http.error_status import failure_message
from llmd.daemon.errors import LlmdError, UnknownModelError
from llmd.daemon.manager.core import Manager
from llmd.daemon.http.metrics import ASKED_MODEL_KEY, name_model
from llmd.daemon.http.openai_errors import CLIENT_GONE, MODEL_ROUTES, MODELS_LIST_ROUTE, error_response, llmd_error_response
from llmd.daemon.http.upstream import Headers, UpstreamError, find_header
from llmd.daemon.http.upstream import Response as UpstreamResponse

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BODY_BYTES = 32 * 1024 * 1024
# Longer than any model name or alias can be; longer values are not echoed back in a 404.
MAX_MODEL_CHARS = 256
DEFAULT_BODY_TIMEOUT = 30.0
# Headers that describe one hop, or that upstream must compute itself. `authorization` and
# `x-api-key` carry the proxy's API key, which engines must never see. `expect` was answered by
# llmd's own server; the body is sent with the request, so the engine has nothing to continue.
_HOP_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade", b"host", b"content-length",
     b"proxy-authorization", b"proxy-connection", b"authorization", b"x-api-key", b"expect"}
)
# After a 401, 408 or 413 the rest of the body is not wanted: close instead of reading it to the end.
_CLOSE = {"Connection": "close"}


# Of an engine's reply, also left out: its `Server` header, which would tell clients which
# engine and version serve behind llmd.
_ENGINE_ONLY_HEADERS = _HOP_HEADERS | {b"server"}


def _forward_headers(headers: Headers) -> Headers:
    """The end-to-end headers of `headers`, as they came (names in any case)."""
    return [(k, v) for k, v in headers if k.lower() not in _HOP_HEADERS]


def relayed_headers(headers: Headers) -> Headers:
    """The headers of an engine's reply that reach the client: the end-to-end ones, less the
    engine's own `Server`."""
    return [(k, v) for k, v in headers if k.lower() not in _ENGINE_ONLY_HEADERS]


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def _too_large() -> BadRequest:
    return BadRequest(
        413, f"request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB; send a shorter request", headers=_CLOSE
    )


class _ClientLeft(Exception):
    """The client disconnected while sending its request."""


async def _read_body(scope: Scope, receive: Receive, timeout: float) -> bytes:
    """The whole request body; BadRequest if it is too large, TimeoutError if it does not
    arrive within `timeout` seconds, _ClientLeft if the client goes first."""
    declared = find_header(scope["headers"], b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    link = client_link(scope)
    if link is not None and link.request_received:
        # Most requests arrive whole with their head: nothing to wait for, no deadline to arm.
        return await _read_pieces(receive)
    with anyio.fail_after(timeout):
        return await _read_pieces(receive)


async def _read_pieces(receive: Receive) -> bytes:
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientLeft
        body, more = message.get("body", b""), message.get("more_body", False)
        size += len(body)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(body)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _json_kind(value: object) -> str:
    """How a JSON value is named in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def parse_request(body: bytes, content_type: str | None) -> tuple[str, dict[str, Any]]:
    """The `model` of an OpenAI request body and the whole parsed body, or BadRequest saying
    what is wrong with it.

    The body must be declared JSON: a page of another site can make a browser POST here without
    asking first only with no Content-Type or a form's or text's, so refusing those keeps such
    pages from starting engines."""
    if content_type is None:
        raise BadRequest(415, "Content-Type must be application/json, and the request has none; send the header "
                              "'Content-Type: application/json' with the JSON body")
    if "json" not in content_type.split(";")[0].lower():
        raise BadRequest(415, f"Content-Type must be application/json, not {content_type!r}; send the body as JSON")
    try:
        payload = json.loads(body)
    except ValueError as exc:  # also bad UTF-8, and integers too long for Python to convert
        raise BadRequest(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(400, "request body is not valid JSON: it is nested too deeply; send a flatter object") from None
    if not isinstance(payload, dict):
        raise BadRequest(
            400, f'request body must be a JSON object like {{"model": "NAME", ...}}, not {_json_kind(payload)}'
        )
    if "model" not in payload:
        raise BadRequest(400, "request body has no 'model' field; name one of GET /v1/models", "model")
    model = payload["model"]
    if not isinstance(model, str):
        raise BadRequest(400, f"'model' must be a string naming one of GET /v1/models, not {_json_kind(model)}", "model")
    if not model:
        raise BadRequest(400, "'model' is an empty string; name one of GET /v1/models", "model")
    if len(model) > MAX_MODEL_CHARS:
        raise BadRequest(400, f"'model' is {len(model)} characters long, longer than any model name; name one of GET /v1/models", "model")
    return model, payload


class BearerAuth:
    """ASGI middleware: a request reaches `app` only with `Authorization: Bearer SECRET` for one of `secrets`.

    `credential` says in error messages which setting holds the secrets; `reject` shapes the 401 body,
    and `reject_for(path)`, when given, the body for a path whose API has its own error shape.
    With `api_key_header`, an `x-api-key: SECRET` header is accepted too (Anthropic's clients send one).
    """

    def __init__(
        self,
        app: ASGIApp,
        secrets: Sequence[str],
        *,
        credential: str,
        reject: Callable[[str], Response],
        reject_for: Callable[[str], Callable[[str], Response] | None] | None = None,
        api_key_header: bool = False,
    ) -> None:
        if not secrets:
            raise ValueError("BearerAuth needs at least one secret")
        self.app = app
        # Compared as SHA-256 digests: equal lengths, so the comparison does not reveal a secret's length.
        self._digests = [hashlib.sha256(secret.encode()).digest() for secret in secrets]
        self._credential = credential
        self._reject = reject
        self._reject_for = reject_for
        self._api_key_header = api_key_header

    def matches(self, token: bytes) -> bool:
        """Whether `token` is one of the secrets. Every secret is compared in constant time, with no
        early exit on a match, so timing reveals neither whether nor which secret matched."""
        digest = hashlib.sha256(token).digest()
        matched = False
        for expected in self._digests:
            matched |= hmac.compare_digest(digest, expected)
        return matched

    def problem(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """What is wrong with the request's credentials, or None if they are good."""
        value = find_header(headers, b"authorization")
        api_key = find_header(headers, b"x-api-key") if self._api_key_header else None
        if api_key is not None and api_key.strip():
            if self.matches(api_key.strip()):
                return None
            if value is None:
                return f"the x-api-key header was not accepted; SECRET must be {self._credential}"
        if value is None:
            also = " (or 'x-api-key: SECRET')" if self._api_key_header else ""
            return f"authentication required: send the header 'Authorization: Bearer SECRET'{also} where SECRET is {self._credential}"
        scheme, _, token = value.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return f"the Authorization header must read 'Bearer SECRET' where SECRET is {self._credential}"
        if not self.matches(token):
            return f"the Bearer token was not accepted; SECRET must be {self._credential}"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        problem = self.problem(scope["headers"])
        if problem is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await WebSocketClose(code=1008, reason="authentication required")(scope, receive, send)
        else:
            shaped = self._reject_for(scope["path"]) if self._reject_for is not None else None
            response = (shaped or self._reject)(problem)
            response.headers["WWW-Authenticate"] = 'Bearer realm="llmd"'
            # The body stays unread: close rather than let an unauthenticated client stream it to us.
            response.headers.update(_CLOSE)
            await response(scope, receive, send)


def _unauthorized(message: str) -> Response:
    return error_response(401, message, code="invalid_api_key")


class _ClientGone(Exception):
    """The client disconnected before its reply was complete."""


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    # Called once the body has been read: the next message is the disconnect, whenever it comes.
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _unless_disconnected(scope: Scope, receive: Receive, work: Callable[[], Awaitable[T]]) -> T:
    """`work()`, cancelled if the client disconnects first: a request nobody waits for must not
    keep a model busy, sit in a queue, or keep an engine generating. Raises _ClientGone then.

    Under llmd's own server the disconnect is reported by the connection itself (`ClientLink`);
    elsewhere a task waits on `receive()` for it."""
    link = client_link(scope)
    if link is not None:
        with anyio.CancelScope() as cancel:
            forget = link.on_disconnect(cancel.cancel)
            try:
                return await work()
            finally:
                forget()
        raise _ClientGone
    finished = False
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
        try:
            result = await work()
            finished = True
        except Exception as exc:  # re-raised as is below, not wrapped in the task group's ExceptionGroup
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if not finished:
        raise _ClientGone
    return result


async def stream_while_connected(
    scope: Scope, receive: Receive, relay: Callable[[], Awaitable[None]], close: Callable[[], None]
) -> None:
    """A streamed reply: `relay()` sends it, stopped if the client disconnects; `close()` then runs
    whatever ended it (done, client gone, engine gone)."""
    try:
        # The server's `send` does not fail once the client is gone: the disconnect stops
        # the relay, and so the generation, at once.
        await _unless_disconnected(scope, receive, relay)
    except _ClientGone:
        pass
    finally:
        close()


def _stream_error(name: str) -> bytes:
    message = json.dumps({"error": {"message": f"engine for {name!r} broke off the stream", "type": "upstream_error"}})
    return f"data: {message}\n\n".encode()


class RelayResponse(Response):
    """Streams an engine's reply as it arrives, each piece sent on as soon as it is read:
    straight from the engine's socket to the client's under llmd's own server (`client_link`),
    through `send` elsewhere.
    Whatever ends the response (done, client gone, engine gone), the upstream response is
    closed and the model released exactly once: as soon as the engine's reply has ended, before
    the last bytes reach a slow client, so that its slot goes to the next request at once."""

    def __init__(
        self,
        upstream: UpstreamResponse,
        name: str,
        headers: Headers,
        *,
        on_close: Callable[[], None],
        on_broken: Callable[[], None],
    ) -> None:
        self.status_code = upstream.status
        self.raw_headers = headers
        self.background = None
        self._upstream = upstream
        self._on_close = on_close
        self._on_broken = on_broken
        self._name = name
        self._closed = False

    def _close_upstream(self) -> None:
        """Close the upstream response and release the model, the first time only."""
        if self._closed:
            return
        self._closed = True
        try:
            self._upstream.close()  # never waits: a cancelled request still closes upstream
        finally:
            self._on_close()

    async def _relay(self, scope: Scope, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            link = client_link(scope)
            write = link.writer(scope.get(BODY_TAP_KEY)) if link is not None else None
            if write is not None:
                # The engine connection's read callback writes each piece to the client itself.
                await self._upstream.pipe(write, lambda: send({"type": "http.response.body", "body": b"", "more_body": True}))
            else:
                async for chunk in self._upstream:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as exc:
            log.warning("stream from %s broke off: %r", self._name, exc)
            self._on_broken()  # an engine that broke off a reply may be dying: look at once
            self._close_upstream()
            await send({"type": "http.response.body", "body": _stream_error(self._name), "more_body": True})
        # The engine's part is over: what is left is llmd's writing to the client.
        self._close_upstream()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await stream_while_connected(scope, receive, lambda: self._relay(scope, send), self._close_upstream)


class _Relayed(Response):
    """A whole reply from an engine, headers as the engine sent them less the hop-by-hop ones."""

    def __init__(self, content: bytes, status: int, headers: Headers) -> None:
        self.status_code = status
        self.body = content
        self.background = None
        self.raw_headers = [*headers, (b"content-length", str(len(content)).encode())]


def _with_model(payload: dict[str, Any], name: str) -> bytes:
    return json.dumps({**payload, "model": name}).encode()


class Proxy:
    def __init__(self, manager: Manager, body_timeout: float = DEFAULT_BODY_TIMEOUT) -> None:
        self.manager = manager
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI endpoint of the OpenAI routes that name a model. It is reached before
        Starlette's router and middleware (`_ModelRoutesFirst`), so it answers its own failures."""
        try:
            response = await self.forward(scope, receive)
        except Exception:
            log.exception("llmd failed on %s %s", scope["method"], scope["path"])
            response = _failure_reply(scope["method"], scope["path"])
        await response(scope, receive, send)

    async def forward(self, scope: Scope, receive: Receive) -> Response:
        """The reply to one request: the engine's, or an error saying what to fix."""
        headers: Headers = scope["headers"]
        try:
            # The body is read before a model is acquired, so a slow client holds a connection,
            # never a model; the deadline bounds even that.
            body = await _read_body(scope, receive, self.body_timeout)
            content_type = find_header(headers, b"content-type")
            model, payload = parse_request(body, None if content_type is None else content_type.decode("latin-1"))
            scope[ASKED_MODEL_KEY] = model  # for the request log, should the name match no profile
            profile = self.manager.resolve(model)
            # For the metrics middleware, which labels the request by the model it reached.
            name_model(scope, profile.name)
            if model != profile.name:
                body = _with_model(payload, profile.name)  # engines such as fastllm only know the profile's name
        except BadRequest as exc:
            return error_response(exc.status, exc.message, param=exc.param, headers=exc.headers)
        except TimeoutError:
            message = f"request body did not arrive within {self.body_timeout:g}s; send the whole body without pausing"
            return error_response(408, message, headers=_CLOSE)
        except UnknownModelError as exc:
            return error_response(404, str(exc), code="model_not_found", param="model")
        except _ClientLeft:
            return Response(status_code=CLIENT_GONE)
        try:
            return await _unless_disconnected(scope, receive, lambda: self._exchange(scope, body, profile.name))
        except _ClientGone:
            return Response(status_code=CLIENT_GONE)

    async def _exchange(self, scope: Scope, body: bytes, name: str) -> Response:
        """Acquire the model, send the request to its engine, and relay the reply."""
        try:
            inst = await self.manager.acquire(name)
        except LlmdError as exc:  # a full queue (429), no room (503), an engine that would not start (503)
            return llmd_error_response(exc)
        try:
            assert inst.client is not None  # a ready instance always has one
            upstream = await inst.client.request(scope["method"], scope["path"], _forward_headers(scope["headers"]), body)
        except BaseException as exc:
            self.manager.release(inst)
            if isinstance(exc, UpstreamError):
                self.manager.engine_failed(inst)
                return error_response(502, f"engine for {name!r} did not answer: {exc}", code="engine_error")
            raise

        headers = relayed_headers(upstream.headers)
        if (upstream.header(b"content-type") or b"").startswith(b"text/event-stream"):
            return RelayResponse(
                upstream,
                name,
                headers,
                on_close=lambda: self.manager.release(inst),
                on_broken=lambda: self.manager.engine_failed(inst),
            )
        try:
            content = await upstream.read()
        except UpstreamError as exc:
            self.manager.engine_failed(inst)
            return error_response(502, f"engine for {name!r} broke off its reply: {exc}", code="engine_error")
        finally:
            self.manager.release(inst)
            upstream.close()
        return _Relayed(content, upstream.status, headers)

    async def read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body of a request that a route translates before handing it to `forward`
        (another API's), read as `forward` reads it; None if the client left while sending it.
        BadRequest says what to fix: 413 too large, 408 too slow."""
        try:
            return await _read_body(scope, receive, self.body_timeout)
        except TimeoutError:
            message = f"request body did not arrive within {self.body_timeout:g}s; send the whole body without pausing"
            raise BadRequest(408, message, headers=_CLOSE) from None
        except _ClientLeft:
            return None

    async def list_models(self, request: Request) -> Response:
        """Every name a request may use: each profile's, and each of its aliases."""
        created = int(time.time())
        profiles = self.manager.profiles
        data = [_model_object(name, created) for name in sorted([*profiles.profiles, *profiles.aliases])]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        """One model by name or alias (OpenAI's `GET /v1/models/{model}`), or a 404 in OpenAI's shape."""
        name = request.path_params["model"]
        try:
            self.manager.resolve(name)
        except UnknownModelError as exc:
            return llmd_error_response(exc)
        return JSONResponse(_model_object(name, int(time.time())))


def _model_object(name: str, created: int) -> dict[str, Any]:
    """OpenAI's model object."""
    return {"id": name, "object": "model", "created": created, "owned_by": "llmd"}


def _failure_reply(method: str, path: str) -> Response:
    """The reply to a request llmd itself failed on: OpenAI's shape for the client, and the
    traceback (logged by whoever caught the exception) for the daemon's log."""
    return error_response(500, failure_message(method, path))


@dataclass(frozen=True)
class ClientApi:
    """A client API the proxy listener speaks besides OpenAI's (Anthropic's Messages, say)."""

    # Its POST routes that name a model, each with the ASGI endpoint that answers it.
    endpoints: Mapping[str, ASGIApp]
    # Whether a path belongs to it, and its 401 reply for a missing or wrong API key.
    owns: Callable[[str], bool]
    unauthorized: Callable[[str], Response]
    # Its other routes (model listings, say), served through Starlette's router as /v1/models is.
    routes: Sequence[Route] = ()
    # Its error reply (status, message, headers) for a wrong path or method, or a fault of
    # llmd's own, on a path it owns; None: OpenAI's.
    error: Callable[[int, str, dict[str, str] | None], Response] | None = None


def _error_reply(path: str, apis: Sequence[ClientApi]) -> Callable[[int, str, dict[str, str] | None], Response]:
    """How an error on `path` is shaped: as the API that owns the path has it, else as OpenAI's."""
    for api in apis:
        if api.error is not None and api.owns(path):
            return api.error
    return lambda status, message, headers: error_response(status, message, headers=headers)


class _ModelRoutesFirst:
    """The proxy port's app. A POST to a route that names a model (nearly every request) goes
    straight to its endpoint (the proxy, for OpenAI's routes), past two layers of Starlette
    middleware and a search of the routes; every other request goes through Starlette's router,
    which also answers a wrong path (404) or method (405)."""

    def __init__(self, endpoints: Mapping[str, ASGIApp], router: ASGIApp) -> None:
        self.endpoints = endpoints
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoints.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint is not None:
            await endpoint(scope, receive, send)
        else:
            await self.router(scope, receive, send)


async def _http_error(request: Request, exc: Exception, apis: Sequence[ClientApi] = ()) -> Response:
    assert isinstance(exc, HTTPException)
    reply = _error_reply(request.url.path, apis)
    if exc.status_code == 404:
        served = f"{', '.join(MODEL_ROUTES)} and {MODELS_LIST_ROUTE}"
        return reply(404, f"no route {request.method} {request.url.path}; llmd serves {served}", None)
    if exc.status_code == 405:
        # Starlette lists the methods in set order; sorted, the message reads the same every time.
        allowed = ", ".join(sorted(m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()))
        return reply(405, f"method {request.method} is not allowed on {request.url.path}; use {allowed}", exc.headers)
    return reply(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", None)


async def _internal_error(request: Request, exc: Exception, apis: Sequence[ClientApi] = ()) -> Response:
    # Starlette's error middleware raises `exc` again once this is sent: uvicorn logs it.
    reply = _error_reply(request.url.path, apis)
    return reply(500, failure_message(request.method, request.url.path), None)


def build_proxy_app(
    proxy: Proxy, api_keys: Sequence[str] = (), extra_routes: Sequence[Route] = (), apis: Sequence[ClientApi] = ()
) -> ASGIApp:
    """The proxy's ASGI app, speaking OpenAI's API and `apis`; with `api_keys`, every route (models
    list and `extra_routes` included) requires one, as a Bearer token or an `x-api-key` header."""
    endpoints: dict[str, ASGIApp] = {path: proxy for path in MODEL_ROUTES}
    for api in apis:
        endpoints.update(api.endpoints)
    routes = [
        # Their POSTs never get here (`_ModelRoutesFirst`): the routes make other methods a 405.
        *(Route(path, endpoint, methods=["POST"]) for path, endpoint in endpoints.items()),
        Route(MODELS_LIST_ROUTE, proxy.list_models, methods=["GET"]),
        Route(MODELS_LIST_ROUTE + "/{model}", proxy.get_model, methods=["GET"]),
        *(route for api in apis for route in api.routes),
        *extra_routes,
    ]
    handlers = {HTTPException: partial(_http_error, apis=apis), Exception: partial(_internal_error, apis=apis)}
    router = Starlette(routes=routes, exception_handlers=handlers)
    app = _ModelRoutesFirst(endpoints, router)
    if not api_keys:
        return app

    def reject_for(path: str) -> Callable[[str], Response] | None:
        return next((api.unauthorized for api in apis if api.owns(path)), None)

    return BearerAuth(
        app,
        api_keys,
        credential="one of the keys in [server] api_keys",
        reject=_unauthorized,
        reject_for=reject_for,
        api_key_header=True,
    )

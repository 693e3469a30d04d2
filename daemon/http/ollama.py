"""Ollama's API on the proxy's listener, for clients that speak it (Open WebUI's Ollama
connection, Home Assistant, the `ollama` libraries), whatever engine a profile runs.

A generation or embedding request is translated (ollama_requests.py) into the OpenAI-compatible
request the engine serves, and handed to the proxy's own `Proxy.forward`, as if the client had
sent it to `/v1/...`: the same admission and load on demand, the same upstream pool, the same
disconnect handling. The engine's reply is translated back (ollama_replies.py): a whole one as
one JSON object, a stream as NDJSON lines while it arrives. The request is counted and logged
under its Ollama route (api "ollama"), with the engine's token counts and timings handed to
the metrics (`engine_figures`), since the translated reply no longer shows them.

A stream is relayed through ASGI `send`, never through the client link's short cut
(client_link.py): each piece must be translated before the client sees it.

Models are profiles. A name resolves as a profile's name or alias, with or without a tag
(`demo`, `demo:latest` and `demo:q4` are the profile `demo`, unless a profile is named
`demo:q4`). `keep_alive` sets how long the model stays loaded once idle, until it stops
(`Manager.keep_alive`). Models are made and removed by editing profiles, so `/api/create`,
`/api/copy`, `/api/delete` and `/api/push` answer with an error saying so; `/api/pull`
downloads a profile's model, as `llmctl pull` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from llmd.daemon.errors import LlmdError, UnknownModelError
from llmd.daemon.http.client_link import CLIENT_LINK
from llmd.daemon.http.error_status import status_of
from llmd.daemon.http.metrics import ASKED_MODEL_KEY, engine_figures, name_model
from llmd.daemon.http.ollama_errors import (
    CHAT_ROUTE,
    EMBED_ROUTE,
    EMBEDDINGS_ROUTE,
    GENERATE_ROUTE,
    NDJSON,
    ROOT_ROUTE,
    ROOT_TEXT,
    is_ollama_path,
    ollama_error,
)
from llmd.daemon.http.ollama_models import ModelCatalog, ps_entry, running, show_body, tag_entry
from llmd.daemon.http.ollama_replies import (
    Clock,
    StreamTranslator,
    chat_reply,
    created_at,
    embed_reply,
    embeddings_reply,
    engine_error,
    generate_reply,
)
from llmd.daemon.http.ollama_requests import (
    EngineCall,
    OllamaRequestError,
    chat_call,
    check_declared_json,
    embed_call,
    generate_call,
    is_load_only,
    model_of,
    names_to_try,
    parse_body,
    parse_keep_alive,
    wants_stream,
)
from llmd.daemon.http.openai_errors import CLIENT_GONE
from llmd.daemon.http.proxy import BadRequest, ClientApi, Proxy, RelayResponse
from llmd.daemon.manager.state import State
from llmd.daemon.models.profiles import Profile

log = logging.getLogger(__name__)

# The Ollama release whose API this follows. Clients compare versions to decide what to ask
# for (structured outputs, tools), so it is Ollama's number, not llmd's.
OLLAMA_API_VERSION = "0.12.0"
PULL_PROGRESS_SECONDS = 0.5
# How `/api/create` and its kind are answered.
_PROFILES_ONLY = (
    "llmd manages models through profiles, not through Ollama's API: {what} is not available. "
    "Add, change or remove a profile (a TOML file in llmd's profile directory, `llmctl profile new`), "
    "then `llmctl reload`"
)

Handler = Callable[[Request], Awaitable[Response]]


def _engine_scope(scope: Scope, path: str, length: int) -> Scope:
    """The request as the proxy sees it: an OpenAI request for `path` with a JSON body of
    `length` bytes. Everything else (client, link, the metrics' hooks) stays the client's."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]
    return {**scope, "path": path, "raw_path": path.encode(), "headers": headers}


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the proxy: the translated body first, then the client's own messages
    (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _unlinked(scope: Scope) -> Scope:
    """`scope` without the client link, so that a relay sends every piece through `send`."""
    extensions = {key: value for key, value in scope.get("extensions", {}).items() if key != CLIENT_LINK}
    return {**scope, "extensions": extensions}


class NdjsonRelay(Response):
    """An engine's streamed reply (`RelayResponse`) relayed as Ollama's NDJSON: each piece is
    translated on its way to `send`. `after` runs once the relay has ended and released the
    model, however it ended."""

    def __init__(self, relay: RelayResponse, translator: StreamTranslator, after: Callable[[], None]) -> None:
        self.status_code = relay.status_code
        self.background = None
        self.raw_headers = [(b"content-type", NDJSON.encode())]
        self._relay = relay
        self._translator = translator
        self._after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        translator = self._translator

        async def translated(message: Message) -> None:
            if message["type"] == "http.response.start":
                await send({"type": "http.response.start", "status": message["status"], "headers": self.raw_headers})
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            more = message.get("more_body", False)
            lines = translator.feed(message.get("body", b""))
            if not more:
                lines += translator.finish()
            if lines or not more:
                await send({"type": "http.response.body", "body": lines, "more_body": more})

        try:
            await self._relay(_unlinked(scope), receive, translated)
        finally:
            self._after()


class OllamaApi:
    """The routes of Ollama's API, served by `proxy` and its manager."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.manager = proxy.manager
        self.catalog = ModelCatalog()
        # Warnings already logged: clients send the same options with every request.
        self._warned: set[tuple[str, str]] = set()

    def routes(self) -> list[Route]:
        guarded = self._guarded
        return [
            Route(ROOT_ROUTE, self.root, methods=["GET"]),
            Route(CHAT_ROUTE, guarded(self.chat), methods=["POST"]),
            Route(GENERATE_ROUTE, guarded(self.generate), methods=["POST"]),
            Route(EMBED_ROUTE, guarded(self.embed), methods=["POST"]),
            Route(EMBEDDINGS_ROUTE, guarded(self.embeddings), methods=["POST"]),
            Route("/api/tags", guarded(self.tags), methods=["GET"]),
            Route("/api/ps", guarded(self.ps), methods=["GET"]),
            Route("/api/show", guarded(self.show), methods=["POST"]),
            Route("/api/version", self.version, methods=["GET"]),
            Route("/api/pull", guarded(self.pull), methods=["POST"]),
            Route("/api/delete", self.unsupported, methods=["DELETE"]),
            Route("/api/copy", self.unsupported, methods=["POST"]),
            Route("/api/create", self.unsupported, methods=["POST"]),
            Route("/api/push", self.unsupported, methods=["POST"]),
            Route("/api/blobs/{digest}", self.unsupported, methods=["POST", "HEAD"]),
        ]

    @staticmethod
    def _guarded(handler: Handler) -> Handler:
        """`handler`, with the errors it raises answered in Ollama's shape."""

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except OllamaRequestError as exc:
                return ollama_error(exc.status, exc.message)
            except BadRequest as exc:
                return ollama_error(exc.status, exc.message, exc.headers)
            except LlmdError as exc:  # no room, a full queue, an engine that would not start
                meaning = status_of(exc)
                return ollama_error(meaning.status, str(exc), meaning.headers)

        return guarded

    # ----- reading requests -----

    async def _payload(self, request: Request) -> dict[str, Any] | None:
        """The request's JSON object; None if the client left while sending it."""
        check_declared_json(request.headers.get("content-type"), request.headers.get("origin"))
        body = await self.proxy.read_body(request.scope, request.receive)
        return None if body is None else parse_body(body)

    def _profile(self, asked: str) -> Profile:
        """The profile an Ollama model name means (see `names_to_try`); 404 if none."""
        for name in names_to_try(asked):
            try:
                return self.manager.resolve(name)
            except UnknownModelError:
                continue
        invalid = getattr(self.manager.profiles, "errors", {})
        for name in names_to_try(asked):
            if name in invalid:
                raise OllamaRequestError(f"model {asked!r} has an invalid profile: {invalid[name]}", 404)
        raise OllamaRequestError(
            f"model {asked!r} not found: no profile has that name or alias; GET /api/tags lists the models", 404
        )

    def _model_request(self, request: Request, payload: dict[str, Any]) -> tuple[str, Profile]:
        """The model a request names and its profile, recorded for the metrics and the request log."""
        asked = model_of(payload)
        request.scope[ASKED_MODEL_KEY] = asked
        profile = self._profile(asked)
        name_model(request.scope, profile.name)
        return asked, profile

    def _ctx(self, profile: Profile) -> int:
        """The context the model runs with, or will be started with."""
        inst = self.manager.instances.get(profile.name)
        if inst is not None and inst.placement is not None:
            return inst.placement.ctx
        return profile.launch.ctx

    # ----- generation -----

    async def chat(self, request: Request) -> Response:
        return await self._generation(request, chat=True)

    async def generate(self, request: Request) -> Response:
        return await self._generation(request, chat=False)

    async def _generation(self, request: Request, *, chat: bool) -> Response:
        clock = Clock()
        payload = await self._payload(request)
        if payload is None:
            return Response(status_code=CLIENT_GONE)
        asked, profile = self._model_request(request, payload)
        if is_load_only(payload, chat):
            return await self._load_only(asked, profile, parse_keep_alive(payload.get("keep_alive")), chat=chat)
        make_call = chat_call if chat else generate_call
        call = make_call(payload, profile.name, self._ctx(profile))
        whole = chat_reply if chat else generate_reply
        return await self._send(request, call, asked, profile, clock, lambda engine: whole(engine, asked, clock), chat)

    async def _load_only(self, asked: str, profile: Profile, keep_alive: float | None, *, chat: bool) -> Response:
        """Ollama's load (a request with nothing to answer) and unload (the same, `keep_alive` 0)."""
        if keep_alive == 0:
            self.manager.keep_alive(profile.name, 0)  # stopped once idle: requests in flight finish first
            reason = "unload"
        else:
            await self.manager.ensure_ready(profile.name)
            if keep_alive is not None:
                self.manager.keep_alive(profile.name, keep_alive)
            reason = "load"
        reply: dict[str, Any] = {"model": asked, "created_at": created_at()}
        if chat:
            reply["message"] = {"role": "assistant", "content": ""}
        else:
            reply["response"] = ""
        reply.update({"done_reason": reason, "done": True})
        return JSONResponse(reply)

    async def _send(
        self,
        request: Request,
        call: EngineCall,
        asked: str,
        profile: Profile,
        clock: Clock,
        whole: Callable[[dict[str, Any]], dict[str, Any]],
        chat: bool,
    ) -> Response:
        """Hand the translated request to the proxy; translate its reply."""
        scope = request.scope
        for warning in call.warnings:
            if (profile.name, warning) not in self._warned:
                self._warned.add((profile.name, warning))
                log.warning("%s: %s (logged once)", profile.name, warning)
        body = json.dumps(call.body).encode()
        before = self._state(profile.name)
        clock.sent = time.perf_counter_ns()
        response = await self.proxy.forward(_engine_scope(scope, call.path, len(body)), _replay(body, request.receive))
        clock.load_ns = self._load_ns(profile.name, before)

        def after() -> None:
            if call.keep_alive is not None:
                self.manager.keep_alive(profile.name, call.keep_alive)

        if isinstance(response, RelayResponse):
            translator = StreamTranslator(
                asked, clock, chat=chat, on_figures=lambda timings, usage: engine_figures(scope, timings, usage)
            )
            return NdjsonRelay(response, translator, after)
        if response.status_code == CLIENT_GONE:
            return response
        content = bytes(response.body)
        if response.status_code >= 400:
            retry = response.headers.get("retry-after")
            message = engine_error(response.status_code, content)
            if response.status_code == 404:  # the model was found: it is the route the engine lacks
                message = f"the {profile.engine} engine of {profile.name!r} does not serve {call.path}: {message}"
            return ollama_error(response.status_code, message, {"Retry-After": retry} if retry else None)
        try:
            engine = json.loads(content)
        except ValueError:
            engine = None
        if not isinstance(engine, dict):
            return ollama_error(502, f"the engine for {profile.name!r} answered with something that is not a JSON object")
        engine_figures(scope, engine.get("timings"), engine.get("usage"))
        after()
        return JSONResponse(whole(engine))

    def _state(self, name: str) -> State | None:
        inst = self.manager.instances.get(name)
        return None if inst is None else inst.state

    def _load_ns(self, name: str, before: State | None) -> int:
        """How long the model took to become ready for this request: its load or its wake."""
        inst = self.manager.instances.get(name)
        if inst is None or before is State.READY:
            return 0
        seconds = inst.wake_seconds if before is State.SLEEPING else inst.load_seconds
        return round((seconds or 0.0) * 1e9)

    # ----- embeddings -----

    async def embed(self, request: Request) -> Response:
        return await self._embedding(request, legacy=False)

    async def embeddings(self, request: Request) -> Response:
        return await self._embedding(request, legacy=True)

    async def _embedding(self, request: Request, *, legacy: bool) -> Response:
        clock = Clock()
        payload = await self._payload(request)
        if payload is None:
            return Response(status_code=CLIENT_GONE)
        asked, profile = self._model_request(request, payload)
        call = embed_call(payload, profile.name, legacy=legacy)

        def whole(engine: dict[str, Any]) -> dict[str, Any]:
            return embeddings_reply(engine) if legacy else embed_reply(engine, asked, clock)

        return await self._send(request, call, asked, profile, clock, whole, chat=False)

    # ----- models -----

    async def root(self, request: Request) -> Response:
        return PlainTextResponse(ROOT_TEXT)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_API_VERSION})

    async def tags(self, request: Request) -> Response:
        profiles = sorted(self.manager.profiles.profiles.items())
        described = await anyio.to_thread.run_sync(lambda: [self.catalog.describe(profile) for _, profile in profiles])
        return JSONResponse({"models": [tag_entry(name, files) for (name, _), files in zip(profiles, described)]})

    async def ps(self, request: Request) -> Response:
        instances = running(self.manager)
        described = await anyio.to_thread.run_sync(lambda: [self.catalog.describe(inst.profile) for inst in instances])
        return JSONResponse({"models": [ps_entry(inst, files) for inst, files in zip(instances, described)]})

    async def show(self, request: Request) -> Response:
        payload = await self._payload(request)
        if payload is None:
            return Response(status_code=CLIENT_GONE)
        _, profile = self._model_request(request, payload)
        files = await anyio.to_thread.run_sync(self.catalog.describe, profile)
        return JSONResponse(show_body(profile, files, self._ctx(profile)))

    async def pull(self, request: Request) -> Response:
        """Download a profile's model (as `llmctl pull`), with Ollama's progress lines."""
        payload = await self._payload(request)
        if payload is None:
            return Response(status_code=CLIENT_GONE)
        _, profile = self._model_request(request, payload)
        stream = wants_stream(payload)
        job = self.manager.run_job(self.manager.pull, profile.name)
        if not stream:
            await job.done.wait()
            if job.error is not None:
                raise job.error
            return JSONResponse({"status": "success"})
        inst = self.manager.instance(profile.name)

        async def lines() -> AsyncIterator[bytes]:
            yield _line({"status": "pulling manifest"})
            while not job.done.is_set():
                with anyio.move_on_after(PULL_PROGRESS_SECONDS):
                    await job.done.wait()
                progress = inst.download
                if progress is not None and not job.done.is_set():
                    digest = "sha256:" + _digest_of(progress.filename)
                    yield _line({
                        "status": f"pulling {digest[7:19]}",
                        "digest": digest,
                        "total": progress.total if progress.total is not None else progress.done,
                        "completed": progress.done,
                    })
            if job.error is not None:
                yield _line({"error": str(job.error)})
                return
            for status in ("verifying sha256 digest", "writing manifest", "success"):
                yield _line({"status": status})

        return StreamingResponse(lines(), media_type=NDJSON)

    async def unsupported(self, request: Request) -> Response:
        what = f"{request.method} {request.url.path}"
        return ollama_error(400, _PROFILES_ONLY.format(what=what))


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def _digest_of(filename: str) -> str:
    return hashlib.sha256(filename.encode()).hexdigest()


def ollama_api(proxy: Proxy) -> ClientApi:
    """Ollama's API, for `build_proxy_app`. Its routes go through Starlette's router (none of
    them is hot enough to need the proxy's short cut), which also shapes a wrong path's or
    method's error as Ollama's."""
    return ClientApi(
        endpoints={},
        owns=is_ollama_path,
        unauthorized=lambda message: ollama_error(401, message),
        routes=OllamaApi(proxy).routes(),
        error=ollama_error,
    )

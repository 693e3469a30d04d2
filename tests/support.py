"""Test helpers: a stand-in manager and engine for testing the proxy in-process, and a way to give a
real daemon extra `[server]` settings."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import anyio
import httpx
from starlette.types import ASGIApp

from llmd.daemon.errors import UnknownModelError
from llmd.daemon.http.proxy import Proxy, build_proxy_app
from llmd.daemon.http.upstream import Pool


@dataclass
class FakeProfile:
    name: str


@dataclass
class FakeInstance:
    name: str
    client: Pool | None = None


class FakeManager:
    """Serves the models named; `acquire_error` makes every acquire fail with it (an LlmdError
    as the real manager's, any other exception as a fault of llmd's own)."""

    def __init__(self, engine: FakeEngine, names: Sequence[str] = ("tiny",)) -> None:
        # Every instance's connections go to `engine`, served in the event loop the proxy runs in.
        self.engine = engine
        self.client: Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.profiles = SimpleNamespace(profiles={name: FakeProfile(name) for name in names}, aliases={})
        self.in_flight = 0
        self.acquired = 0
        self.acquire_error: Exception | None = None
        self.failures: list[str] = []  # names of the models reported as failed, in order

    def resolve(self, model: str) -> FakeProfile:
        profile = self.profiles.profiles.get(model)
        if profile is None:
            raise UnknownModelError(f"model {model!r} does not exist; GET /v1/models lists the served models")
        return profile

    async def acquire(self, name: str) -> FakeInstance:
        if self.acquire_error is not None:
            raise self.acquire_error
        if self._loop is not asyncio.get_running_loop():
            self._loop = asyncio.get_running_loop()
            self.client = Pool("127.0.0.1", await self.engine.serve())
        self.in_flight += 1
        self.acquired += 1
        return FakeInstance(name, self.client)

    def release(self, inst: FakeInstance) -> None:
        self.in_flight -= 1

    def engine_failed(self, inst: FakeInstance) -> None:
        self.failures.append(inst.name)


@dataclass
class FakeEngine:
    """Answers like an OpenAI server, over HTTP/1.1 on a loopback port, and records every
    request it was sent."""

    requests: list[httpx.Request] = field(default_factory=list)
    # When set, each request waits here after being recorded, like an engine busy generating.
    hold: anyio.Event | None = None

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.hold is not None:
            await self.hold.wait()
        try:
            stream = bool(json.loads(request.content).get("stream"))
        except (ValueError, AttributeError):
            stream = False
        if stream:
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=b'data: {"x": 1}\n\ndata: [DONE]\n\n')
        return httpx.Response(200, json={"object": "chat.completion", "choices": []})

    async def serve(self) -> int:
        """Listen on a loopback port in the running event loop; return the port."""

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[:-2]
                    method, target, _ = head[0].split(" ")
                    # As bytes: HTTP allows any octet above 0x7f in a value, and the proxy passes them on.
                    headers = [tuple(part.encode("latin-1") for part in line.split(": ", 1)) for line in head[1:]]
                    length = next((int(v) for k, v in headers if k.lower() == b"content-length"), 0)
                    request = httpx.Request(method, f"http://engine.invalid{target}", headers=headers,
                                            content=await reader.readexactly(length))
                    response = await self.handle(request)
                    lines = [f"HTTP/1.1 {response.status_code} {response.reason_phrase}"]
                    lines += [f"{k}: {v}" for k, v in response.headers.multi_items()]
                    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.content)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the proxy closed the connection
            finally:
                writer.close()

        server = await asyncio.start_server(connection, "127.0.0.1", 0)
        return int(server.sockets[0].getsockname()[1])


def fake_proxy_app(
    api_keys: Sequence[str] = (), names: Sequence[str] = ("tiny",), body_timeout: float = 30.0
) -> tuple[ASGIApp, FakeManager, FakeEngine]:
    """The real proxy app, over a fake manager whose engine is `FakeEngine`."""
    engine = FakeEngine()
    manager = FakeManager(engine, names)
    proxy = Proxy(manager, body_timeout=body_timeout)  # type: ignore[arg-type]
    return build_proxy_app(proxy, api_keys), manager, engine


def assert_openai_error(response: httpx.Response, status: int | None = None) -> str:
    """Assert the response is an OpenAI-shaped error (of `status`, if given); return its message."""
    if status is not None:
        assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert "param" in error and "code" in error
    return error["message"]


def daemon_with_server_settings(  # type: ignore[no-untyped-def]
    make_daemon: Callable, settings: str, profiles: dict[str, str] | None = None, start: bool = True
):
    """A daemon from the `make_daemon` fixture with `settings` (TOML lines) added to its [server] table."""
    daemon = make_daemon(profiles, start=False)
    config = daemon.root / "llmd.toml"
    config.write_text(config.read_text().replace("[server]\n", "[server]\n" + textwrap.dedent(settings), 1))
    if start:
        daemon.start()
    return daemon

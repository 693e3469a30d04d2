"""Test helpers: a stand-in manager and engine for testing the proxy in-process, and a way to give a
real daemon extra `[server]` settings."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import anyio
import httpx
from starlette.types import ASGIApp

from llmd.daemon.errors import LlmdError, UnknownModelError
from llmd.daemon.proxy import Proxy, build_proxy_app


@dataclass
class FakeProfile:
    name: str


@dataclass
class FakeInstance:
    name: str
    client: httpx.AsyncClient | None = None


class FakeManager:
    """Serves the models named; `acquire_error` makes every acquire fail with it."""

    def __init__(self, names: Sequence[str] = ("tiny",)) -> None:
        # Every instance's engine connection; the proxy talks to whatever client an instance has.
        self.client: httpx.AsyncClient | None = None
        self.profiles = SimpleNamespace(profiles={name: FakeProfile(name) for name in names})
        self.in_flight = 0
        self.acquired = 0
        self.acquire_error: LlmdError | None = None

    def resolve(self, model: str) -> FakeProfile:
        profile = self.profiles.profiles.get(model)
        if profile is None:
            raise UnknownModelError(f"model {model!r} does not exist; GET /v1/models lists the served models")
        return profile

    async def acquire(self, name: str) -> FakeInstance:
        if self.acquire_error is not None:
            raise self.acquire_error
        self.in_flight += 1
        self.acquired += 1
        return FakeInstance(name, self.client)

    def release(self, inst: FakeInstance) -> None:
        self.in_flight -= 1

    def engine_failed(self, inst: FakeInstance) -> None:
        pass


@dataclass
class FakeEngine:
    """Answers like an OpenAI server and records every request it was sent."""

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


def fake_proxy_app(
    api_keys: Sequence[str] = (), names: Sequence[str] = ("tiny",), body_timeout: float = 30.0
) -> tuple[ASGIApp, FakeManager, FakeEngine]:
    """The real proxy app, over a fake manager whose engine is `FakeEngine`."""
    manager = FakeManager(names)
    engine = FakeEngine()
    proxy = Proxy(manager, body_timeout=body_timeout)  # type: ignore[arg-type]
    manager.client = httpx.AsyncClient(base_url="http://engine.invalid", transport=httpx.MockTransport(engine.handle))
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

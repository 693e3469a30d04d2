"""Hostile clients against a real daemon with a real llama-server: request heads that never end
or never finish, more connections than a listener takes, a descriptor limit used up by idle
connections, and pages of other sites (DNS rebinding, requests a browser sends unasked).

After each, the daemon still serves, and its engine is the one it had.
"""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import BIN, free_port, tiny_profile, wait_until
from support import assert_openai_error, daemon_with_server_settings

from llmd.daemon.engines.supervisor import EngineProcess
from llmd.daemon.http.host_check import HostCheck, host_name
from llmd.daemon.manager.supervision import HEALTH_INTERVAL

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
KiB = 1024
MiB = 1024 * KiB
TOKEN = "management-token-0123456789"
EVIL = "evil.example"


def _chat_works(daemon) -> bool:  # type: ignore[no-untyped-def]
    response = httpx.post(daemon.url + "/v1/chat/completions", json=CHAT, timeout=60)
    assert response.status_code == 200, response.text
    return True


def _models_answer(daemon) -> bool:  # type: ignore[no-untyped-def]
    try:
        return httpx.get(daemon.url + "/v1/models", timeout=10).status_code == 200
    except httpx.TransportError:
        return False


def _read_until_closed(sock: socket.socket, timeout: float = 30) -> bytes:
    """Everything the server sends until it closes the connection (a reset ends it too)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def _error_message(reply: bytes) -> str:
    return str(json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["message"])


def _rss(daemon) -> int:  # type: ignore[no-untyped-def]
    return int(psutil.Process(daemon.process.pid).memory_info().rss)


@pytest.fixture
def daemon(make_daemon, tiny_gguf: Path):  # type: ignore[no-untyped-def]
    return make_daemon({"tiny": tiny_profile(tiny_gguf, ctx=4096)})


# ----- request heads -----


def _flood_headers(port: int, stop_at: int, piece: int = KiB, pause: float = 0.01) -> tuple[int, bytes]:
    """Send header lines, `piece` bytes at a time with a `pause` between, until the server answers
    or closes, or `stop_at` bytes are sent; then read its reply. Returns the bytes sent before it
    answered, and the reply."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    with closing(sock):
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        line = b"X-Flood: " + b"a" * 90 + b"\r\n"
        lines = line * max(1, piece // len(line))
        sent = 0
        while sent < stop_at:
            readable, _, _ = select.select([sock], [], [], pause)
            if readable:
                break
            try:
                sock.sendall(lines)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(lines)
        return sent, _read_until_closed(sock)


@pytest.mark.engine
def test_a_header_flood_gets_431_before_64_kib_and_costs_no_memory(daemon) -> None:  # type: ignore[no-untyped-def]
    # Past the 32 KiB limit the client stops sending and waits: only the limit can answer it.
    sent, reply = _flood_headers(daemon.port, stop_at=48 * KiB)
    assert _status(reply) == 431, reply[:300]
    assert sent < 64 * KiB
    assert "larger than 32 KiB" in _error_message(reply)
    # A whole head too large, sent at once, is refused too.
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
        line = b"X-Big: " + b"b" * 1000 + b"\r\n"
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" + line * 40 + b"\r\n")
        assert _status(_read_until_closed(sock)) == 431

    # Endless floods (16 MiB each, were they read) are cut off near the limit: memory stays flat.
    before = _rss(daemon)
    for _ in range(6):
        sent, _ = _flood_headers(daemon.port, stop_at=16 * MiB, piece=16 * KiB, pause=0)
        assert sent < 16 * MiB, "the daemon kept reading an endless head"
    assert _rss(daemon) - before < 24 * MiB, f"RSS grew from {before} to {_rss(daemon)}"
    assert _chat_works(daemon) and daemon.process.poll() is None
    assert "Traceback" not in daemon.log()


@pytest.mark.engine
def test_a_head_that_never_ends_and_a_silent_connection_are_closed(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_with_server_settings(make_daemon, "head_timeout = 2\n", {"tiny": tiny_profile(tiny_gguf)})
    with ExitStack() as stack:
        partial = stack.enter_context(socket.create_connection(("127.0.0.1", daemon.port), timeout=30))
        silent = stack.enter_context(socket.create_connection(("127.0.0.1", daemon.port), timeout=30))
        started = time.monotonic()
        partial.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        reply = _read_until_closed(partial)
        assert 1.5 < time.monotonic() - started < 15
        assert _status(reply) == 408, reply
        assert "did not arrive within 2s ([server] head_timeout)" in _error_message(reply)
        assert _read_until_closed(silent) == b""  # nothing was asked: closed without a word
        assert time.monotonic() - started < 15

        # An idle kept-alive connection is closed too, once its reply is sent.
        kept = stack.enter_context(socket.create_connection(("127.0.0.1", daemon.port), timeout=30))
        kept.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = _read_until_closed(kept, timeout=30)
        assert _status(reply) == 200 and b'"object":"list"' in reply
    assert _models_answer(daemon) and "Traceback" not in daemon.log()


def _hold(stack: ExitStack, port: int, count: int) -> list[socket.socket]:
    """`count` open connections that the server took. One it refused (a connection of before
    it had yet to see closed still counted) is replaced."""
    held: list[socket.socket] = []
    while len(held) < count:
        held.append(stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30)))
        if len(held) == count:
            refused = select.select(held, [], [], 0.3)[0]
            held = [sock for sock in held if sock not in refused]
    return held


@pytest.mark.engine
def test_connections_past_the_limit_get_503_and_the_others_are_served(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    limit = 12
    daemon = daemon_with_server_settings(
        make_daemon, f"max_connections = {limit}\nhead_timeout = 120\n", {"tiny": tiny_profile(tiny_gguf)}
    )
    with ExitStack() as stack:
        held = _hold(stack, daemon.port, limit)
        extra = stack.enter_context(socket.create_connection(("127.0.0.1", daemon.port), timeout=30))
        reply = _read_until_closed(extra)
        assert _status(reply) == 503, reply
        assert "[server] max_connections" in _error_message(reply)
        # The connections within the limit are served, and the management socket is its own.
        held[0].sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert _status(_read_until_closed(held[0])) == 200
        assert daemon.ps() is not None
    # Once they are closed, new connections are taken again.
    wait_until(lambda: _models_answer(daemon), timeout=30, what="a new connection to be served")
    assert _chat_works(daemon) and "Traceback" not in daemon.log()
    assert "refused a connection with 503" in daemon.log()  # said once, not once per connection


# ----- descriptors -----


def _start_with_open_files(daemon, limit: int) -> None:  # type: ignore[no-untyped-def]
    """Start `daemon` with RLIMIT_NOFILE at `limit`, soft and hard (so it cannot raise it)."""

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with daemon.log_path.open("ab") as log:
        daemon.process = subprocess.Popen(
            [str(BIN / "llmd"), "serve", "--config", str(daemon.root / "llmd.toml")],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=limited,
        )
    wait_until(daemon._listening, timeout=30, what=f"llmd to listen (log: {daemon.log_path})")


def _open_idle(port: int, count: int) -> Iterator[socket.socket]:
    for _ in range(count):
        try:
            yield socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            return  # the backlog is full: enough are open


@pytest.mark.engine
def test_idle_connections_that_use_up_descriptors_kill_no_engine(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_with_server_settings(
        make_daemon, "head_timeout = 300\n", {"tiny": tiny_profile(tiny_gguf)}, start=False
    )
    _start_with_open_files(daemon, 256)
    assert "open files limit: 256" in daemon.log()
    daemon.llmctl("load", "tiny")
    pid = daemon.ps()[0]["pid"]
    with ExitStack() as stack:
        for sock in _open_idle(daemon.port, 300):
            stack.enter_context(sock)
        # The health probe runs every second: it finds no descriptor to probe with, and says so.
        wait_until(lambda: "not counted against the engine" in daemon.log(), timeout=60,
                   what=f"a health probe while out of descriptors (log: {daemon.log_path})")
        # Several more probes fail the same way (two failures in a row used to kill the engine).
        time.sleep(3 * HEALTH_INTERVAL)
        assert daemon.process.poll() is None
    # The idle connections are gone: the probe works again, and it never killed the engine.
    wait_until(lambda: "its health probe can be made again" in daemon.log(), timeout=60, what="the probe to resume")
    assert daemon.process.poll() is None, daemon.log()
    assert [row["pid"] for row in daemon.ps()] == [pid]
    assert psutil.pid_exists(pid)
    assert _chat_works(daemon)
    assert "killing it" not in daemon.log() and "Traceback" not in daemon.log()


def test_an_engine_is_watched_without_a_pidfd_when_none_can_be_opened(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import errno

    import anyio

    def no_descriptor(pid: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "pidfd_open", no_descriptor)
    popen = subprocess.Popen(["sleep", "0.3"])
    engine = EngineProcess("tiny", ["sleep"], 0, tmp_path / "tiny.log", popen)
    assert anyio.run(engine.wait_exit) == 0


# ----- other sites' pages -----


@pytest.mark.parametrize(
    ("header", "name"),
    [("localhost", "localhost"), ("localhost:8808", "localhost"), ("[::1]:8808", "::1"), ("[::1]", "::1"),
     ("127.0.0.1:1", "127.0.0.1"), ("evil.example:80", "evil.example"), ("::1", "::1"), ("a:b", None),
     ("[::1]x", None), ("", None)],
)
def test_host_names_are_read_from_the_header(header: str, name: str | None) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(
    ("header", "admitted"),
    [(b"localhost:8808", True), (b"LOCALHOST", True), (b"localhost.", True), (b"app.localhost", True),
     (b"127.0.0.1:8808", True), (b"127.9.9.9", True), (b"[::1]:8808", True), (b"[::ffff:127.0.0.1]", True),
     (b"evil.example", False), (b"evil.example:8808", False), (b"localhost.evil.example", False),
     (b"10.0.0.1", False), (b"0.0.0.0", False), (b"llm.lan:8808", True), (b"LLM.lan", True), (b"x:y", False)],
)
def test_loopback_names_and_configured_ones_are_admitted(header: bytes, admitted: bool) -> None:
    assert HostCheck(["llm.lan"]).admits(header) is admitted
    assert HostCheck(["*"]).admits(header) is True


def _unix_client(daemon) -> httpx.Client:  # type: ignore[no-untyped-def]
    return httpx.Client(base_url="http://llmd", transport=httpx.HTTPTransport(uds=str(daemon.socket)), timeout=30)


@pytest.mark.engine
def test_dns_rebinding_is_refused_on_every_loopback_listener(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    settings = f'management_listen = "127.0.0.1:{port}"\nmanagement_token = "{TOKEN}"\nallowed_hosts = ["llm.lan"]\n'
    daemon = daemon_with_server_settings(make_daemon, settings, {"tiny": tiny_profile(tiny_gguf)})
    rebound = {"host": f"{EVIL}:{daemon.port}", "origin": f"http://{EVIL}:{daemon.port}"}

    # The OpenAI port: a page of evil.example whose name now resolves to 127.0.0.1.
    listed = httpx.get(daemon.url + "/v1/models", headers=rebound, timeout=30)
    message = assert_openai_error(listed, 403)
    assert f"Host '{EVIL}:{daemon.port}'" in message and "[server] allowed_hosts" in message
    chat = httpx.post(daemon.url + "/v1/chat/completions", json=CHAT, headers=rebound, timeout=30)
    assert chat.status_code == 403
    for host in ("localhost", f"localhost:{daemon.port}", f"127.0.0.1:{daemon.port}", f"llm.lan:{daemon.port}"):
        assert httpx.get(daemon.url + "/v1/models", headers={"host": host}, timeout=30).status_code == 200, host

    # The management socket, forwarded to loopback (ssh -L): state-changing requests and reads alike.
    with _unix_client(daemon) as local:
        load = local.post("/v1/models/tiny/load", headers=rebound)
        assert load.status_code == 403 and "[server] allowed_hosts" in load.json()["error"]
        assert local.get("/v1/ps", headers=rebound).status_code == 403
        assert local.get("/v1/ps").status_code == 200  # llmctl's Host
        assert local.get("/v1/ps", headers={"host": "llm.lan"}).status_code == 200

    # The management port, even with the token.
    bearer = {"authorization": f"Bearer {TOKEN}"}
    url = f"http://127.0.0.1:{port}"
    refused = httpx.post(url + "/v1/models/tiny/load", headers={**bearer, **rebound, "host": f"{EVIL}:{port}"}, timeout=30)
    assert refused.status_code == 403 and EVIL in refused.json()["error"]
    assert httpx.get(url + "/v1/ps", headers=bearer, timeout=30).status_code == 200

    assert daemon.state("tiny") is None  # nothing of it started an engine
    assert _chat_works(daemon)


@pytest.mark.engine
def test_requests_a_browser_sends_unasked_start_no_engine(daemon) -> None:  # type: ignore[no-untyped-def]
    # Without asking the server first, a page may only POST a form's or text's body, or none
    # at all; a page's requests carry its Origin.
    page = {"origin": "http://elsewhere.example"}
    body = json.dumps(CHAT).encode()
    for headers in ({}, {"content-type": "text/plain"}, page, {**page, "content-type": "text/plain"}):
        response = httpx.post(daemon.url + "/v1/chat/completions", content=body, headers=headers, timeout=30)
        assert response.status_code == 415, (headers, response.text)
    ollama = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        response = httpx.post(daemon.url + "/api/chat", content=ollama,
                              headers={**page, "content-type": content_type}, timeout=30)
        assert response.status_code == 415 and "Content-Type: application/json" in response.json()["error"]
    assert daemon.state("tiny") is None
    # Ollama's own clients (curl -d says "form", and sends no Origin) still work.
    response = httpx.post(daemon.url + "/api/chat", content=ollama, timeout=60,
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text

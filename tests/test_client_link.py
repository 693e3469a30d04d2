"""The proxy's short cuts under llmd's own server (`client_link`): relayed streams written
straight from the engine's socket to the client's, and disconnects reported by the connection.
The real proxy app and metrics under the daemon's own uvicorn server, in front of a scripted
engine, with clients on real sockets: the framing, the body taps, back-pressure from a slow
client, and clients that leave."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import httptools
import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from llmd.daemon.http.client_link import BODY_TAP_KEY, _HeadHoldingTransport, client_link
from llmd.daemon.main import _server
from llmd.daemon.http.metrics import Metrics
from llmd.daemon.http.proxy import Proxy, build_proxy_app
from tests.support import FakeManager

pytestmark = pytest.mark.anyio

STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
REQUEST = json.dumps({"model": "tiny", "stream": True}).encode()
JSON = {"content-type": "application/json"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def dechunked(reply: bytes) -> bytes:
    """The body of one whole HTTP response, its framing checked and taken off."""
    body = bytearray()
    ended = []
    parser = httptools.HttpResponseParser(
        SimpleNamespace(on_body=body.extend, on_message_complete=lambda: ended.append(True))
    )
    parser.feed_data(bytes(reply))
    assert ended, "the reply did not end"
    return bytes(body)


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class ScriptedEngine:
    """A loopback engine that answers every request with `script`; what FakeManager connects to."""

    script: Script
    written: int = 0  # pieces the script has handed to the socket so far
    manager: FakeManager | None = None  # the manager the proxy in front of it uses
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)

    async def serve(self) -> int:
        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:"))
                    await reader.readexactly(length)
                    await self.script(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                self.closed_by_client.set()
            finally:
                writer.close()

        server = await asyncio.start_server(connection, "127.0.0.1", 0)
        return int(server.sockets[0].getsockname()[1])


class TapRecorder:
    """Middleware that taps reply bodies as the metrics do (the metrics' tap, outside it, still
    sees them), and records whether each reply could take the short cut."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.tapped: list[bytes] = []
        self.direct: list[bool] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outer = scope.get(BODY_TAP_KEY)

        def tap(body: bytes) -> None:
            self.tapped.append(body)
            if outer is not None:
                outer(body)

        scope[BODY_TAP_KEY] = tap

        async def watch(message: dict) -> None:  # type: ignore[type-arg]
            await send(message)
            if message["type"] == "http.response.start":
                link = client_link(scope)
                self.direct.append(link is not None and link.writer(None) is not None)

        await self.app(scope, receive, watch)


@dataclass
class Proxied:
    port: int
    recorder: TapRecorder
    metrics: Metrics

    def errors(self, reason: str) -> float:
        labels = {"model": "tiny", "endpoint": "/v1/chat/completions", "reason": reason}
        return self.metrics.registry.get_sample_value("llmd_request_errors_total", labels) or 0.0


@pytest.fixture
async def proxy_for() -> AsyncIterator[Callable[[ScriptedEngine], Awaitable[Proxied]]]:
    servers = []

    async def start(engine: ScriptedEngine, body_timeout: float = 30.0) -> Proxied:
        engine.manager = FakeManager(engine)  # type: ignore[arg-type]
        recorder = TapRecorder(build_proxy_app(Proxy(engine.manager, body_timeout)))  # type: ignore[arg-type]
        metrics = Metrics(True, models=list, gpus=lambda: {"gpus": []})
        server = _server(metrics.instrument(recorder), 1.0)
        sock = socket.create_server(("127.0.0.1", 0))
        task = asyncio.create_task(server.serve([sock]))
        servers.append((server, task))
        while not server.started:
            await asyncio.sleep(0.01)
        return Proxied(sock.getsockname()[1], recorder, metrics)

    yield start
    for server, task in servers:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def three_events(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(STREAM_HEAD)
    for n in range(3):
        writer.write(chunk(b'data: {"n": %d}\n\n' % n))
        await writer.drain()
        await asyncio.sleep(0.01)
    writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    await writer.drain()


async def test_a_stream_is_written_straight_to_the_client_in_valid_chunks(proxy_for) -> None:  # type: ignore[no-untyped-def]
    proxied = await proxy_for(ScriptedEngine(three_events))
    expected = b'data: {"n": 0}\n\ndata: {"n": 1}\n\ndata: {"n": 2}\n\ndata: [DONE]\n\n'
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxied.port}") as client:
        for _ in range(2):  # twice on one keep-alive connection: the first reply ended properly
            async with client.stream("POST", "/v1/chat/completions", content=REQUEST, headers=JSON) as response:
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream"
                assert b"".join([piece async for piece in response.aiter_raw()]) == expected
    assert proxied.recorder.direct == [True, True]
    assert b"".join(proxied.recorder.tapped) == expected * 2  # the taps saw every piece written past `send`


async def test_without_uvicorn_the_relay_goes_through_send() -> None:
    engine = ScriptedEngine(three_events)
    recorder = TapRecorder(build_proxy_app(Proxy(FakeManager(engine))))  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=recorder)
    async with httpx.AsyncClient(transport=transport, base_url="http://llmd") as client:
        response = await client.post("/v1/chat/completions", content=REQUEST, headers=JSON)
    assert response.content.endswith(b"data: [DONE]\n\n")
    assert recorder.direct == [False] and recorder.tapped == []


async def test_a_slow_client_holds_the_engine_back(proxy_for) -> None:  # type: ignore[no-untyped-def]
    piece = b"data: " + b"x" * 16_000 + b"\n\n"
    total = 1600  # about 26 MB: several times what the socket buffers between here and there hold

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(STREAM_HEAD)
        for _ in range(total):
            writer.write(chunk(piece))
            await writer.drain()
            engine.written += 1
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    engine = ScriptedEngine(flood)
    proxied = await proxy_for(engine)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(client, ("127.0.0.1", proxied.port))
    await loop.sock_sendall(client, b"POST /v1/chat/completions HTTP/1.1\r\nhost: llmd\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\n\r\n%b"
                            % (len(REQUEST), REQUEST))
    await asyncio.sleep(1.0)  # the client reads nothing meanwhile
    assert 0 < engine.written < total // 2, f"the engine wrote {engine.written} of {total} pieces to a client that read none"
    received = bytearray()
    while not received.endswith(b"\r\n0\r\n\r\n"):
        data = await asyncio.wait_for(loop.sock_recv(client, 1 << 20), 10)
        assert data, "the proxy closed the connection before the end of the reply"
        received += data
    client.close()
    assert engine.written == total
    assert dechunked(received) == piece * total
    assert proxied.recorder.direct == [True]


async def test_a_client_that_leaves_mid_stream_closes_the_engine_connection(proxy_for) -> None:  # type: ignore[no-untyped-def]
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(STREAM_HEAD)
        while True:
            writer.write(chunk(b'data: {"token": "x"}\n\n'))
            await writer.drain()
            await asyncio.sleep(0.005)

    engine = ScriptedEngine(endless)
    proxied = await proxy_for(engine)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxied.port}") as client:
        async with client.stream("POST", "/v1/chat/completions", content=REQUEST, headers=JSON) as response:
            async for _ in response.aiter_raw():
                break
    await asyncio.wait_for(engine.closed_by_client.wait(), 5)
    assert proxied.recorder.direct == [True]
    assert engine.manager is not None and engine.manager.in_flight == 0
    await wait_for_metric(lambda: proxied.errors("client_gone") == 1)
    assert proxied.errors("stream_broken") == 0


async def test_a_client_that_leaves_before_the_reply_starts_frees_the_engine_at_once(proxy_for) -> None:  # type: ignore[no-untyped-def]
    reached = asyncio.Event()

    async def thinking(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reached.set()
        await reader.read()  # an engine still working on its answer, until the proxy hangs up
        raise ConnectionError("the proxy closed the connection")

    engine = ScriptedEngine(thinking)
    proxied = await proxy_for(engine)
    client = socket.create_connection(("127.0.0.1", proxied.port))
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: llmd\r\ncontent-type: application/json\r\n"
                   b"content-length: %d\r\n\r\n%b" % (len(REQUEST), REQUEST))
    await asyncio.wait_for(reached.wait(), 5)
    client.close()
    # The connection reports the disconnect: the request to the engine is closed, the model released.
    await asyncio.wait_for(engine.closed_by_client.wait(), 5)
    assert engine.manager is not None
    await wait_for_metric(lambda: engine.manager.in_flight == 0)
    await wait_for_metric(lambda: proxied.errors("client_gone") == 1)


async def wait_for_metric(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_an_engine_that_breaks_off_a_stream_gets_an_error_event_and_a_health_check(proxy_for) -> None:  # type: ignore[no-untyped-def]
    async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(STREAM_HEAD + chunk(b'data: {"n": 0}\n\n'))
        await writer.drain()
        writer.transport.abort()
        raise ConnectionError("the engine died")

    engine = ScriptedEngine(dies)
    proxied = await proxy_for(engine)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxied.port}") as client:
        response = await client.post("/v1/chat/completions", content=REQUEST, headers=JSON)
    events = response.content.split(b"\n\n")
    assert events[0] == b'data: {"n": 0}'
    assert json.loads(events[1].removeprefix(b"data: "))["error"]["message"] == "engine for 'tiny' broke off the stream"
    assert engine.manager is not None
    assert engine.manager.failures == ["tiny"] and engine.manager.in_flight == 0


async def test_a_whole_reply_goes_out_in_one_write(proxy_for) -> None:  # type: ignore[no-untyped-def]
    reply = json.dumps({"choices": [{"message": {"content": "hi"}}]}).encode()

    async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                     % (len(reply), reply))
        await writer.drain()

    proxied = await proxy_for(ScriptedEngine(answers))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxied.port)
    request = json.dumps({"model": "tiny"}).encode()
    for _ in range(2):  # and the next reply on the same connection too
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%b" % (len(request), request))
        # One write: the first read after the reply starts arriving holds all of it.
        first = await asyncio.wait_for(reader.read(65536), 5)
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"\r\n\r\n" + reply)
    writer.close()


async def test_a_request_whose_body_never_comes_gets_408(proxy_for) -> None:  # type: ignore[no-untyped-def]
    engine = ScriptedEngine(three_events)
    proxied = await proxy_for(engine, body_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxied.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n")  # and nothing more
    reply = await asyncio.wait_for(reader.read(65536), 5)
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert b"request body did not arrive within 0.3s" in reply
    assert engine.manager is not None and engine.manager.in_flight == 0
    writer.close()


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def cycle_for(method: str = "POST") -> SimpleNamespace:
    return SimpleNamespace(response_started=False, response_complete=False, chunked_encoding=None,
                           expected_content_length=0, scope={"method": method})


def holding(cycle: SimpleNamespace) -> tuple[_HeadHoldingTransport, RecordingTransport]:
    real = RecordingTransport()
    return _HeadHoldingTransport(real, cycle), real  # type: ignore[arg-type]


def start(cycle: SimpleNamespace, *, chunked: bool, length: int = 0) -> None:
    """What uvicorn's cycle has decided when it writes a response's head."""
    cycle.response_started, cycle.chunked_encoding, cycle.expected_content_length = True, chunked, length


def test_the_head_of_a_reply_with_a_length_goes_out_with_its_body() -> None:
    cycle = cycle_for()
    transport, real = holding(cycle)
    start(cycle, chunked=False, length=4)
    transport.write(b"HEAD\r\n\r\n")
    assert real.writes == []
    transport.write(b"body")
    transport.write(b"more")  # only the head is ever held
    assert real.writes == [b"HEAD\r\n\r\nbody", b"more"]


def test_a_streams_head_goes_out_at_once() -> None:
    cycle = cycle_for()
    transport, real = holding(cycle)
    start(cycle, chunked=True)
    transport.write(b"HEAD\r\n\r\n")
    assert real.writes == [b"HEAD\r\n\r\n"]


@pytest.mark.parametrize("method, length", [("HEAD", 4), ("POST", 0)], ids=["HEAD-request", "empty-body"])
def test_a_head_no_body_follows_goes_out_at_once(method: str, length: int) -> None:
    cycle = cycle_for(method)
    transport, real = holding(cycle)
    start(cycle, chunked=False, length=length)
    transport.write(b"HEAD\r\n\r\n")
    assert real.writes == [b"HEAD\r\n\r\n"]


def test_100_continue_goes_out_at_once_and_the_head_is_still_held() -> None:
    cycle = cycle_for()
    transport, real = holding(cycle)
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response starts
    start(cycle, chunked=False, length=4)
    transport.write(b"HEAD\r\n\r\n")
    transport.write(b"body")
    assert real.writes == [b"HTTP/1.1 100 Continue\r\n\r\n", b"HEAD\r\n\r\nbody"]


def test_closing_with_a_head_held_writes_it_first() -> None:
    cycle = cycle_for()
    transport, real = holding(cycle)
    start(cycle, chunked=False, length=4)
    transport.write(b"HEAD\r\n\r\n")
    transport.close()
    assert real.writes == [b"HEAD\r\n\r\n"] and real.closed
    assert transport.is_closing()  # everything else is the real transport's

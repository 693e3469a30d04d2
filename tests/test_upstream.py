"""The proxy's engine connection pool (`llmd.daemon.http.upstream`) against a real loopback server
that answers as scripted: framing, keep-alive, stale connections, and closing early."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import pytest
from llmd.daemon.http.upstream import JOIN_LIMIT, READ_HIGH_WATER, Pool, UpstreamError

pytestmark = pytest.mark.anyio

HEADERS = [(b"content-type", b"application/json"), (b"x-trace", b"kept")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the pool is asyncio's (the daemon runs on uvloop)


@dataclass
class Received:
    head: bytes
    body: bytes


@dataclass
class Engine:
    """A loopback server; `script(conn_number, request_number_on_it, received, writer)` answers."""

    script: Callable[[int, int, Received, asyncio.StreamWriter], Awaitable[bool]]
    port: int = 0
    connections: int = 0
    requests: list[Received] = field(default_factory=list)
    # Set when the client closed a connection the engine was still writing to or waiting on.
    client_closed: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        number, count = self.connections, 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.client_closed.set()
                    return
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                received = Received(head, await reader.readexactly(length))
                self.requests.append(received)
                count += 1
                if not await self.script(number, count, received, writer):
                    return
        except ConnectionError:
            self.client_closed.set()
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Engine]]]:
    servers: list[asyncio.Server] = []
    engines: list[Engine] = []

    async def start(script: Callable[[int, int, Received, asyncio.StreamWriter], Awaitable[bool]]) -> Engine:
        engine = Engine(script)
        server = await asyncio.start_server(engine._serve, "127.0.0.1", 0)
        servers.append(server)
        engines.append(engine)
        engine.port = server.sockets[0].getsockname()[1]
        return engine

    yield start
    for server in servers:
        server.close()
    for engine in engines:
        for task in engine.tasks:
            task.cancel()
        await asyncio.gather(*engine.tasks, return_exceptions=True)


def reply(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + b"".join(extra) + (
        b"content-length: %d\r\n\r\n" % len(body)) + body


async def ok(conn: int, n: int, received: Received, writer: asyncio.StreamWriter) -> bool:
    writer.write(reply(b'{"ok": %d}' % n))
    await writer.drain()
    return True


async def test_content_length_body_and_request_bytes(serve) -> None:  # type: ignore[no-untyped-def]
    engine = await serve(ok)
    pool = Pool("127.0.0.1", engine.port)
    big = b'{"model": "tiny", "pad": "' + b"x" * (2 * JOIN_LIMIT) + b'"}'
    for body in (b'{"model": "tiny"}', big):
        response = await pool.request("POST", "/v1/chat/completions", HEADERS, body)
        assert response.status == 200
        assert response.header(b"content-type") == b"application/json"
        assert await response.read() == b'{"ok": %d}' % len(engine.requests)
        response.close()
        assert engine.requests[-1].body == body
    head = engine.requests[0].head.decode()
    assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{engine.port}\r\n" in head and "x-trace: kept\r\n" in head
    await pool.aclose()


def two_events_in_turn(first_seen: asyncio.Event) -> Callable[[int, int, Received, asyncio.StreamWriter], Awaitable[bool]]:
    """An engine script: a stream of two events, the second only once the first was handed on."""

    async def stream(conn: int, n: int, received: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"b\r\ndata: one\n\n\r\n")
        await writer.drain()
        await asyncio.wait_for(first_seen.wait(), 5)
        writer.write(b"b\r\ndata: two\n\n\r\n0\r\n\r\n")
        await writer.drain()
        return True

    return stream


async def test_chunked_body_is_handed_on_as_each_chunk_arrives(serve) -> None:  # type: ignore[no-untyped-def]
    first_seen = asyncio.Event()
    engine = await serve(two_events_in_turn(first_seen))
    pool = Pool("127.0.0.1", engine.port)
    response = await pool.request("POST", "/v1/chat/completions", HEADERS, b"{}")
    assert response.header(b"transfer-encoding") == b"chunked"
    chunks = []
    async for chunk in response:
        chunks.append(chunk)
        first_seen.set()
    assert chunks == [b"data: one\n\n", b"data: two\n\n"]
    assert response.complete and pool.idle_connections == 1  # read to the end: back in the pool
    await pool.aclose()


async def test_keep_alive_connection_is_reused(serve) -> None:  # type: ignore[no-untyped-def]
    engine = await serve(ok)
    pool = Pool("127.0.0.1", engine.port)
    for _ in range(3):
        response = await pool.request("POST", "/x", HEADERS, b"{}")
        await response.read()
        response.close()
    assert engine.connections == 1 and len(engine.requests) == 3
    assert pool.idle_connections == 1
    await pool.aclose()


async def test_a_reply_left_unread_past_the_high_water_mark_leaves_a_usable_connection(serve) -> None:  # type: ignore[no-untyped-def]
    big = b"x" * (READ_HIGH_WATER + 1000)

    async def large(conn: int, n: int, received: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(reply(big))
        await writer.drain()
        return True

    engine = await serve(large)
    pool = Pool("127.0.0.1", engine.port)
    first = await pool.request("POST", "/x", HEADERS, b"{}")
    for _ in range(200):  # the reader pauses the socket once a slow consumer falls this far behind
        if first.complete:
            break
        await asyncio.sleep(0.01)
    assert first.complete
    first.close()  # the client left before the rest was relayed
    with anyio.fail_after(5):  # the pooled connection reads its next reply
        second = await pool.request("POST", "/x", HEADERS, b"{}")
        assert await second.read() == big
    assert engine.connections == 1
    await pool.aclose()


async def test_connection_close_reply_is_not_reused(serve) -> None:  # type: ignore[no-untyped-def]
    async def closing(conn: int, n: int, received: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(reply(b"{}", b"connection: close\r\n"))
        await writer.drain()
        return False

    engine = await serve(closing)
    pool = Pool("127.0.0.1", engine.port)
    for _ in range(2):
        response = await pool.request("POST", "/x", HEADERS, b"{}")
        assert await response.read() == b"{}"
        response.close()
    assert engine.connections == 2 and pool.idle_connections == 0
    await pool.aclose()


async def test_stale_pooled_connection_is_retried_once_on_a_fresh_one(serve) -> None:  # type: ignore[no-untyped-def]
    async def drop_second(conn: int, n: int, received: Received, writer: asyncio.StreamWriter) -> bool:
        if n == 2:
            return False  # closed without a byte, as if it had timed the idle connection out just then
        return await ok(conn, n, received, writer)

    engine = await serve(drop_second)
    pool = Pool("127.0.0.1", engine.port)
    for _ in range(2):
        response = await pool.request("POST", "/x", HEADERS, b"{}")
        assert await response.read() == b'{"ok": 1}'
        response.close()
    assert engine.connections == 2 and len(engine.requests) == 3


async def test_idle_connection_the_engine_closes_leaves_the_pool(serve) -> None:  # type: ignore[no-untyped-def]
    async def answer_then_close(conn: int, n: int, received: Received, writer: asyncio.StreamWriter) -> bool:
        await ok(conn, n, received, writer)
        return False  # keep-alive was offered, but the engine drops the connection afterwards

    engine = await serve(answer_then_close)
    pool = Pool("127.0.0.1", engine.port)
    response = await pool.request("POST", "/x", HEADERS, b"{}")
    await response.read()
    for _ in range(100):
        if pool.idle_connections == 0:
            break
        await asyncio.sleep(0.01)
    assert pool.idle_connections == 0 and pool.open_connections == 0
    response = await pool.request("POST", "/x", HEADERS, b"{}")
    assert await response.read() == b'{"ok": 1}'
    assert engine.connections == 2 and len(engine.requests) == 2  # nothing was sent on the dead one


async def test_fresh_connection_closed_without_an_answer_fails(serve) -> None:  # type: ignore[no-untyped-def]
    async def never(conn: int, n: int, received: Received, writer: asyncio.StreamWriter) -> bool:
        return False

    engine = await serve(never)
    pool = Pool("127.0.0.1", engine.port)
    with pytest.raises(UpstreamError, match="without answering"):
        await pool.request("POST", "/x", HEADERS, b"{}")
    assert len(engine.requests) == 1  # not retried: it reached an engine that would not answer


async def test_nothing_listening_fails_with_upstream_error() -> None:
    from llmd.daemon.engines.supervisor import free_port

    with pytest.raises(UpstreamError, match="cannot connect"):
        await Pool("127.0.0.1", free_port()).request("POST", "/x", HEADERS, b"{}")


async def endless(conn: int, n: int, received: Received, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    while True:  # a generation nobody stops but the client
        writer.write(b"b\r\ndata: tok\n\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.005)


async def test_closing_a_response_early_closes_its_connection(serve) -> None:  # type: ignore[no-untyped-def]
    engine = await serve(endless)
    pool = Pool("127.0.0.1", engine.port)
    response = await pool.request("POST", "/x", HEADERS, b"{}")
    async for _ in response:
        break
    response.close()
    await asyncio.wait_for(engine.client_closed.wait(), 5)  # the engine learns nobody reads on
    assert pool.open_connections == 0 and pool.idle_connections == 0


async def dies_after_one_event(conn: int, n: int, received: Received, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nb\r\ndata: one\n\n\r\n")
    await writer.drain()
    return False  # and hang up


@pytest.mark.parametrize("reader", ["iterate", "pipe"])
async def test_engine_dying_mid_stream_raises_after_what_it_sent(serve, reader: str) -> None:  # type: ignore[no-untyped-def]
    engine = await serve(dies_after_one_event)
    pool = Pool("127.0.0.1", engine.port)
    response = await pool.request("POST", "/x", HEADERS, b"{}")
    chunks: list[bytes] = []
    with pytest.raises(UpstreamError, match="before the end"):
        if reader == "iterate":
            async for chunk in response:
                chunks.append(chunk)
        else:
            await asyncio.wait_for(response.pipe(lambda data: chunks.append(data) is None, asyncio.sleep), 5)
    assert chunks == [b"data: one\n\n"]
    response.close()
    assert pool.open_connections == 0


async def test_content_length_body_cut_short_raises(serve) -> None:  # type: ignore[no-untyped-def]
    async def short(conn: int, n: int, received: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        await writer.drain()
        return False

    engine = await serve(short)
    response = await Pool("127.0.0.1", engine.port).request("POST", "/x", HEADERS, b"{}")
    with pytest.raises(UpstreamError):
        await response.read()


async def test_pool_aclose_closes_idle_and_busy_connections(serve) -> None:  # type: ignore[no-untyped-def]
    engine = await serve(endless)
    pool = Pool("127.0.0.1", engine.port)
    response = await pool.request("POST", "/x", HEADERS, b"{}")
    await pool.aclose()
    await asyncio.wait_for(engine.client_closed.wait(), 5)
    with pytest.raises(UpstreamError):
        async for _ in response:
            pass
    with pytest.raises(UpstreamError, match="closed"):
        await pool.request("POST", "/x", HEADERS, b"{}")


async def test_cancelled_request_closes_its_connection(serve) -> None:  # type: ignore[no-untyped-def]
    async def silent(conn: int, n: int, received: Received, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(30)
        return False

    engine = await serve(silent)
    pool = Pool("127.0.0.1", engine.port)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(pool.request("POST", "/x", HEADERS, b"{}"), 0.2)
    assert pool.open_connections == 0 and pool.idle_connections == 0


async def test_pipe_hands_each_piece_on_from_the_read_callback(serve) -> None:  # type: ignore[no-untyped-def]
    first_seen = asyncio.Event()
    engine = await serve(two_events_in_turn(first_seen))
    pool = Pool("127.0.0.1", engine.port)
    response = await pool.request("POST", "/v1/chat/completions", HEADERS, b"{}")
    pieces: list[bytes] = []
    in_task: list[bool] = []

    def sink(data: bytes) -> bool:
        pieces.append(data)
        in_task.append(asyncio.current_task() is not None)
        first_seen.set()
        return True

    async def never_drained() -> None:
        raise AssertionError("the sink never asked to wait")

    await asyncio.wait_for(response.pipe(sink, never_drained), 5)
    assert pieces == [b"data: one\n\n", b"data: two\n\n"]
    assert in_task[-1] is False  # called from the connection's read callback, not from a task
    assert response.complete and pool.idle_connections == 1
    await pool.aclose()


async def test_pipe_pauses_reading_while_the_sink_is_full(serve) -> None:  # type: ignore[no-untyped-def]
    piece = b"data: " + b"x" * 16_000 + b"\n\n"
    total = 1600  # about 26 MB: several times what loopback socket buffers hold with reading paused
    written = 0

    async def flood(conn: int, n: int, received: Received, writer: asyncio.StreamWriter) -> bool:
        nonlocal written
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(total):
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
            written += 1
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    engine = await serve(flood)
    pool = Pool("127.0.0.1", engine.port)
    response = await pool.request("POST", "/x", HEADERS, b"{}")
    received = bytearray()
    drains = 0
    drained = asyncio.Event()

    async def drain() -> None:
        nonlocal drains
        drains += 1
        await drained.wait()

    def sink(data: bytes) -> bool:
        received.extend(data)
        # Takes the first megabyte, then is full until the test lets the drain through.
        return len(received) < 1_000_000 or drained.is_set()

    piping = asyncio.create_task(response.pipe(sink, drain))
    await asyncio.sleep(0.5)
    assert drains == 1 and written < total // 2, "the engine kept writing while the sink was full"
    drained.set()
    await asyncio.wait_for(piping, 10)
    assert written == total and bytes(received) == piece * total
    await pool.aclose()


async def test_pipe_passes_on_what_was_read_before_it_began_and_a_failing_sink_ends_it(serve) -> None:  # type: ignore[no-untyped-def]
    async def two_then_more(conn: int, n: int, received: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nb\r\ndata: one\n\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"b\r\ndata: two\n\n\r\n")
        await writer.drain()
        await asyncio.sleep(30)
        return False

    engine = await serve(two_then_more)
    pool = Pool("127.0.0.1", engine.port)
    response = await pool.request("POST", "/x", HEADERS, b"{}")
    await asyncio.sleep(0.1)  # the first piece is read before anyone pipes it
    pieces: list[bytes] = []

    def sink(data: bytes) -> bool:
        pieces.append(data)
        if len(pieces) == 2:
            raise RuntimeError("sink broke")
        return True

    with pytest.raises(RuntimeError, match="sink broke"):
        await asyncio.wait_for(response.pipe(sink, asyncio.sleep), 5)
    assert pieces == [b"data: one\n\n", b"data: two\n\n"]
    response.close()  # the reply was not read to its end: its connection is closed
    assert pool.open_connections == 0 and pool.idle_connections == 0

"""HTTP/1.1 to one engine on loopback: a keep-alive connection pool built for the proxy's hop.

The proxy sends every request it relays through here, so this is on the hot path of each small
request and of each streamed event. It is an asyncio protocol with httptools (llhttp, in C)
parsing the responses, and does only what that hop needs:

- the request goes out in one write (head and body together, the body byte for byte);
- the response head is parsed, then the body is handed on as it arrives, chunked or
  content-length, never held back to fill larger pieces: bytes that arrived in one read are
  passed on together, the same as nginx does with `proxy_buffering off`;
- a connection goes back to the pool only after its response was read to the end and the
  engine did not ask to close it; idle connections the engine closes leave the pool at once;
- a request on a pooled connection that the engine closed while it was idle (no byte of a
  response came back) is sent once more on a fresh connection;
- `Response.pipe` hands the body to a callable from the connection's own read callback, with
  no task switch per piece: the proxy's short cut for streams (see `client_link`);
- closing a response before its end closes its connection: that is how an engine learns that
  nobody wants the rest of a generation;
- `Pool.aclose` closes every connection, so an engine that is being stopped does not wait for
  idle keep-alive clients.

There are no read timeouts: a generation may take minutes, and a hung engine is the health
monitor's business.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import cast

import httptools

from llmd.daemon.util import loopback

CONNECT_TIMEOUT = 10.0
# Response bytes buffered for a slow consumer before reading from the engine pauses; the
# engine then feels the client's back-pressure through TCP, as it would talking to it directly.
READ_HIGH_WATER = 256 * 1024
# Request bodies up to this size are joined with the head into one write (one system call);
# a larger body is written after the head rather than copied.
JOIN_LIMIT = 64 * 1024

Headers = list[tuple[bytes, bytes]]


def find_header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header `name` (lower case) in `headers`, or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


class UpstreamError(Exception):
    """The engine could not be reached, or broke off its reply."""


class _Stale(UpstreamError):
    """A pooled connection closed before any byte of a response came back."""


class Response:
    """An engine's response: `status` and `headers` (as sent, raw), then the body through
    `async for chunk in response` or `await response.read()`. `close()` is always safe."""

    __slots__ = (
        "_buffered", "_chunks", "_conn", "_done", "_error", "_sink", "_sink_error", "_sink_full", "_waiter",
        "headers", "status",
    )

    def __init__(self, conn: _Connection) -> None:
        self.status = 0
        self.headers: Headers = []
        self._conn: _Connection | None = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes], bool] | None = None
        self._sink_full = False
        self._sink_error: Exception | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower case), or None."""
        return find_header(self.headers, name)

    @property
    def complete(self) -> bool:
        """Whether the whole body has been received."""
        return self._done

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        while not self._chunks:
            if self._done:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            await self._next_event()
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._conn is not None:
            self._conn.resume_reading()  # a no-op unless a slow reader had paused it
        self._buffered = 0
        if self._done:
            self._release()
        return data

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([chunk async for chunk in self])

    async def pipe(self, sink: Callable[[bytes], bool], drain: Callable[[], Awaitable[object]]) -> None:
        """Hand the rest of the body to `sink`, each piece as it is read, and return at its end.

        `sink` is called from the connection's read callback, so it must not block or raise.
        It returns False when its consumer cannot take more for now: reading then pauses until
        `await drain()` returns. Raises UpstreamError if the engine breaks off the reply."""
        assert self._sink is None, "the body is already being piped"
        if self._chunks:  # read before the pipe began
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            if not sink(data):
                self._sink_full = True  # drained below, before reading resumes
            elif self._conn is not None:
                self._conn.resume_reading()  # a no-op unless the buffered pieces had paused it
        self._sink = sink
        try:
            while True:
                if self._sink_error is not None:
                    raise self._sink_error
                if self._done:
                    self._release()
                    return
                if self._error is not None:
                    raise self._error
                if self._sink_full:
                    await drain()
                    self._sink_full = False
                    if self._conn is not None:
                        self._conn.resume_reading()
                    continue
                await self._next_event()
        finally:
            self._sink = None

    async def _next_event(self) -> None:
        """Wait until the connection has more for this response: body, its end, or an error."""
        conn = self._conn
        assert conn is not None
        self._waiter = conn.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        """Done with this response. Before its end, this closes the connection, which tells
        the engine to stop; after it, the connection went back to the pool already. It never
        waits, so a cancelled caller needs no shield to call it."""
        if self._done:
            self._release()  # read to its end but not drained: the connection is still good
        elif self._conn is not None:
            self._error = self._error or UpstreamError("response closed before its end")
            conn, self._conn = self._conn, None
            conn.close()

    # ----- called by the connection -----

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _body(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            try:
                more = sink(data)
            except Exception as exc:  # not raised into the event loop's callback: the pipe re-raises it
                self._sink, self._sink_error, more = None, exc, False
            if not more:
                self._sink_full = True
                if self._conn is not None:
                    self._conn.pause_reading()
                self._wake()
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= READ_HIGH_WATER and self._conn is not None:
            self._conn.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        if not self._chunks:
            self._release()
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        self._error = error
        self._wake()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.response_done()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; serves one response at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.used = False  # has carried a response before: may be stale when reused
        self.response: Response | None = None
        self._head: asyncio.Future[None] | None = None
        self._got_bytes = False
        self._paused = False
        self._until_close = False
        self._keep = False  # the engine lets this connection carry another request

    # ----- asyncio.Protocol -----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.response is None:
            # Nothing was asked: an engine that talks out of turn cannot be trusted with the next request.
            self.close()
            return
        self._got_bytes = True
        self.pool.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(UpstreamError(f"engine sent a malformed response: {exc}"))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        response = self.response
        if response is None:
            return
        self.response = None
        if self._until_close and self._head is None:
            response._finish()  # a body delimited by the end of the connection: it ended
            return
        if not self._got_bytes and self.used:
            error: UpstreamError = _Stale("the engine had closed the idle keep-alive connection")
        elif not self._got_bytes:
            error = UpstreamError(f"the engine closed the connection without answering ({exc!r})" if exc else
                                  "the engine closed the connection without answering")
        else:
            error = UpstreamError("the engine closed the connection before the end of its reply")
        self._fail(response, error)

    # ----- httptools callbacks -----

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        response.status = self.parser.get_status_code()
        if 100 <= response.status < 200:
            # An interim reply (we never ask for one): the real one follows.
            response.headers.clear()
            return
        chunked = response.header(b"transfer-encoding") is not None
        self._until_close = not chunked and response.header(b"content-length") is None and response.status not in (204, 304)
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._body(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None or 100 <= response.status < 200:
            return
        self.response = None
        self._keep = self.parser.should_keep_alive()
        response._finish()

    # ----- used by Pool and Response -----

    async def send(self, request: Iterable[bytes]) -> Response:
        """Write the request, wait for the response head."""
        assert self.transport is not None and self.response is None
        response = self.response = Response(self)
        self._got_bytes = False
        self._until_close = False
        self._keep = False
        head = self._head = self.loop.create_future()
        for piece in request:
            self.transport.write(piece)
        try:
            await head
        except BaseException:
            self.close()  # cancelled, or failed: this connection's state is unknown now
            raise
        self.used = True
        return response

    def response_done(self) -> None:
        """The current response was read to its end."""
        if self._keep and not self.closed:
            # Reading may still be paused (a slow reader left before draining the last bytes):
            # a paused connection in the pool would never read its next reply.
            self.resume_reading()
            self.pool.put_back(self)
        else:
            self.close()

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self.pool.forget(self)
        response = self.response
        if response is not None:
            self.response = None
            self._fail(response, UpstreamError("the connection to the engine was closed"))

    def _broken(self, error: UpstreamError) -> None:
        response = self.response
        self.response = None
        if self.transport is not None:
            self.transport.abort()
        self.closed = True
        self.pool.forget(self)
        if response is not None:
            self._fail(response, error)

    def _fail(self, response: Response, error: UpstreamError) -> None:
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(error)
        response._fail(error)


class Pool:
    """Keep-alive connections to one engine at `host:port`."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._host_header = f"{host}:{port}".encode()
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._closed = False
        # Bytes read from the engine so far: the health monitor's sign that its replies flow.
        self.received = 0

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def open_connections(self) -> int:
        return len(self._all)

    async def request(self, method: str, path: str, headers: Headers, body: bytes) -> Response:
        """Send a request (`headers` must leave out Host, Content-Length and other hop-by-hop
        headers) and return its response once the head has arrived; UpstreamError if the
        engine cannot be reached or closes the connection without answering."""
        if self._closed:
            raise UpstreamError("the connection pool to the engine is closed")
        request = self._encode(method, path, headers, body)
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue
            try:
                return await conn.send(request)
            except _Stale:
                break  # the engine dropped it while idle; the request never reached it: once more
        conn = await self._connect()
        return await conn.send(request)

    async def aclose(self) -> None:
        """Close every connection, idle or busy; requests after this fail."""
        self._closed = True
        for conn in list(self._all):
            conn.close()
        self._idle.clear()

    def _encode(self, method: str, path: str, headers: Headers, body: bytes) -> list[bytes]:
        lines = [f"{method} {path} HTTP/1.1\r\n".encode("latin-1"), b"host: ", self._host_header, b"\r\n"]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        lines += (b"content-length: ", str(len(body)).encode(), b"\r\n\r\n")
        if len(body) <= JOIN_LIMIT:
            return [b"".join(lines) + body]
        return [b"".join(lines), body]

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                sock = await loopback.connect(self.host, self.port)
                try:
                    transport, conn = await loop.create_connection(lambda: _Connection(self), sock=sock)
                except BaseException:
                    sock.close()
                    raise
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to the engine at {self.host}:{self.port}: {exc!r}") from None
        # uvloop may return before it calls connection_made.
        conn.transport = cast(asyncio.Transport, transport)
        if self._closed:
            conn.close()
            raise UpstreamError("the connection pool to the engine is closed")
        self._all.add(conn)
        return conn

    # ----- called by connections -----

    def put_back(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
        else:
            self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

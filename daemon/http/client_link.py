"""What the proxy may know of a client's connection beyond ASGI: short cuts for relayed streams.

Through plain ASGI, every piece of a streamed reply costs a task switch (the engine connection's
read callback wakes the relaying task) and a walk through every middleware's `send` before
uvicorn writes it; and learning that the client left takes a task of its own, parked on
`receive()` for the whole request. With thousands of events a second, and a request start for
every stream, that is most of what the proxy spends. `LinkedHttpProtocol`, uvicorn's httptools
protocol, offers each request a `ClientLink` (the scope extension `CLIENT_LINK`):

- `ClientLink.writer()` writes body pieces straight to the client's transport, framed as
  uvicorn frames them. The engine connection's read callback calls it, so a piece costs one
  function call. The response still starts and ends through ASGI, so uvicorn keeps its own
  bookkeeping (keep-alive, the end of the response) and every middleware sees both.
- `ClientLink.on_disconnect(callback)` calls `callback` from the server's own `connection_lost`.
- Middleware that watches bodies (the metrics) puts a callable under `BODY_TAP_KEY` in the
  scope; the writer calls it with each piece, since those pieces never pass its `send`.

uvicorn writes a response's head as soon as it is sent, and its body in a write of its own.
On loopback every write wakes the reader, so a whole reply (every non-streamed answer) would
cost two wake-ups where one does: `_HeadHoldingTransport` keeps the head of a response with a
Content-Length until its body is written, and writes both at once.

`client_link(scope)` is None under any other server; the proxy then does it all through ASGI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from llmd.daemon.http.connection_guard import GuardedHttpProtocol

CLIENT_LINK = "llmd.client_link"
BODY_TAP_KEY = "llmd.body_tap"

BodyTap = Callable[[bytes], None]
# Writes one piece of the body; returns False when the client's socket buffer is full, and the
# writer of the next piece should wait until it has drained (`await send` of an empty piece).
BodyWriter = Callable[[bytes], bool]


def _nothing() -> None:
    pass


class ClientLink:
    """One request's client connection, as the server sees it."""

    __slots__ = ("_cycle", "_on_lost")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle
        self._on_lost: list[Callable[[], None]] = []

    @property
    def request_received(self) -> bool:
        """Whether the whole request body has arrived: reading it will not wait."""
        try:
            return not self._cycle.more_body
        except AttributeError:  # a uvicorn whose cycle is built otherwise: assume it may wait
            return False

    @property
    def disconnected(self) -> bool:
        """Whether the client went away before the response was complete."""
        return self._cycle.disconnected

    def on_disconnect(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` when the client goes away before the response is complete (at once,
        if it already has). Returns the function that cancels this."""
        if self._cycle.disconnected:
            callback()
            return _nothing
        self._on_lost.append(callback)
        return lambda: self._on_lost.remove(callback) if callback in self._on_lost else None

    def lost(self) -> None:
        """The connection is gone; called by the protocol."""
        if self._cycle.disconnected:
            callbacks, self._on_lost = self._on_lost, []
            for callback in callbacks:
                callback()

    def writer(self, tap: BodyTap | None) -> BodyWriter | None:
        """A writer of body pieces straight to the client, for a response whose start was sent;
        None where the short cut does not apply (not chunked, a HEAD request), and the pieces
        must go through `send`. `tap` sees every piece written."""
        cycle = self._cycle
        try:
            if not cycle.response_started or cycle.response_complete or not cycle.chunked_encoding:
                return None
            if cycle.scope["method"] == "HEAD":
                return None
            transport, flow = cycle.transport, cycle.flow
            if isinstance(transport, _HeadHoldingTransport):
                transport = transport.transport  # a chunked head is never held
        except AttributeError:  # a uvicorn whose cycle is built otherwise: relay through `send`
            return None

        def write(body: bytes) -> bool:
            # Called from the engine connection's read callback: no await, no exception.
            if cycle.disconnected or cycle.response_complete or transport.is_closing():
                return True  # nobody to write to; the relay learns of it through on_disconnect
            if not body:
                return True  # an empty chunk would end the response
            if tap is not None:
                tap(body)
            transport.write(b"%x\r\n%b\r\n" % (len(body), body))
            return not flow.write_paused

        return write


class _HeadHoldingTransport:
    """The client's transport as one request's cycle sees it: the head of a response with a
    Content-Length waits for the body's write and goes out with it, in one write.

    uvicorn decides the framing before it writes the head, so the cycle says which heads to
    hold: not a chunked one (a stream's head goes out at once, before its first event), not
    one for HEAD (no body follows), nothing before the response starts (`100 Continue`)."""

    __slots__ = ("_cycle", "_head_seen", "_held", "transport")

    def __init__(self, transport: Any, cycle: RequestResponseCycle) -> None:
        self.transport = transport
        self._cycle = cycle
        self._head_seen = False
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self.transport.write(held + data)
            return
        cycle = self._cycle
        if not self._head_seen and cycle.response_started:
            # The first write once the response has started is its head (one cycle, one response).
            self._head_seen = True
            if cycle.chunked_encoding is False and cycle.expected_content_length > 0 and cycle.scope["method"] != "HEAD":
                self._held = data  # its body is on its way
                return
        self.transport.write(data)

    def close(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self.transport.write(held)  # the app failed after the head: as uvicorn would have it
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class LinkedHttpProtocol(GuardedHttpProtocol):
    """uvicorn's httptools protocol, offering each request's app a `ClientLink`, and writing
    a whole reply's head and body at once (`_HeadHoldingTransport`); within the limits of
    `connection_guard` on each connection."""

    _link: ClientLink | None = None

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # not a websocket upgrade
            cycle.transport = _HeadHoldingTransport(self.transport, cycle)  # type: ignore[assignment]
            # The newest request's link: the one uvicorn marks disconnected when the connection
            # goes (with pipelining, as for its own receive(), the newest request's cycle).
            self._link = ClientLink(cycle)
            self.scope.setdefault("extensions", {})[CLIENT_LINK] = self._link  # type: ignore[typeddict-item]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        link, self._link = self._link, None
        if link is not None:
            link.lost()


def client_link(scope: dict[str, Any]) -> ClientLink | None:
    """The request's `ClientLink`, or None when its server offers none."""
    link = scope.get("extensions", {}).get(CLIENT_LINK)
    return link if isinstance(link, ClientLink) else None

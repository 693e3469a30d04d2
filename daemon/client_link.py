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

`client_link(scope)` is None under any other server; the proxy then does it all through ASGI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

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


class LinkedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, offering each request's app a `ClientLink`."""

    _link: ClientLink | None = None

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # not a websocket upgrade
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

"""A short cut for relayed streams: body pieces written straight to the client's socket.

Through ASGI, every piece of a streamed reply costs a task switch (the engine connection's read
callback wakes the relaying task) and a walk through every middleware's `send` before uvicorn
writes it. With thousands of events a second that is most of what the proxy spends. Here the
engine connection's read callback writes each piece to the client's transport itself, framed
as uvicorn frames it; the response still starts and ends through ASGI, so uvicorn keeps its own
bookkeeping (keep-alive, the end of the response) and every middleware sees both.

- `DirectHttpProtocol` is uvicorn's httptools protocol that offers the short cut to the app,
  as the scope extension `DIRECT_BODY`;
- `direct_writer(scope)` returns the writer for a response that has started, or None when the
  short cut does not apply (another server, a response that is not chunked, a HEAD request);
- middleware that watches bodies (the metrics) puts a callable under `BODY_TAP_KEY` in the
  scope; the writer calls it with each piece, since those pieces never pass its `send`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

DIRECT_BODY = "llmd.direct_body"
BODY_TAP_KEY = "llmd.body_tap"

BodyTap = Callable[[bytes], None]
# Writes one piece of the body; returns False when the client's socket buffer is full, and the
# writer of the next piece should wait until it has drained (`await send` of an empty piece).
BodyWriter = Callable[[bytes], bool]


class DirectHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, offering each request's app the `DIRECT_BODY` extension."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # not a websocket upgrade
            self.scope.setdefault("extensions", {})[DIRECT_BODY] = cycle  # type: ignore[typeddict-item]


def direct_writer(scope: dict[str, Any]) -> BodyWriter | None:
    """A writer of body pieces straight to the client, for a response whose start was sent;
    None where the short cut does not apply, and the pieces must go through `send`."""
    cycle = scope.get("extensions", {}).get(DIRECT_BODY)
    if not isinstance(cycle, RequestResponseCycle):
        return None
    if not cycle.response_started or cycle.response_complete or not cycle.chunked_encoding:
        return None
    if cycle.scope["method"] == "HEAD":
        return None
    transport, flow = cycle.transport, cycle.flow
    tap: BodyTap | None = scope.get(BODY_TAP_KEY)

    def write(body: bytes) -> bool:
        # Called from the engine connection's read callback: no await, no exception.
        if cycle.disconnected or cycle.response_complete or transport.is_closing():
            return True  # nobody to write to; the relay learns of the disconnect through receive()
        if not body:
            return True  # an empty chunk would end the response
        if tap is not None:
            tap(body)
        transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        return not flow.write_paused

    return write

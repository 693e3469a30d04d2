"""What one client connection may take from the daemon: bounded request heads, a deadline for
them, and a cap on how many connections a listener keeps open.

uvicorn's httptools protocol reads a request's head without limit (one connection could send
endless header lines, none of which an API key check ever sees, since keys are checked once the
head is complete), and holds a connection that sends a partial head, or nothing, for good.
`GuardedHttpProtocol` adds what it lacks:

- A head larger than `max_head_bytes` gets a 431 and the connection is closed. Heads are
  counted as they arrive: the part already parsed (the URL and every complete header) and each
  read after the one the head began in; either is a lower bound of its size, so a legitimate
  request is never refused, and a growing head is refused within a read of the limit.
- A head that is not complete `head_timeout` seconds after the connection opened (or after the
  first read of it, for the next request on a kept-alive connection) gets a 408 and the
  connection is closed; a connection that sent nothing is closed without a word, as an idle
  kept-alive one is. A head that comes in one read, as nearly every one does, costs no timer.
- Past `max_connections` open connections on the listener, a new one gets a 503 at once and is
  closed, before it costs anything more than its accept.

Idle kept-alive connections are uvicorn's own `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 32 * 1024
# A refusal of each kind is logged at most this often per listener: a flood must not flood the log.
_WARN_EVERY_SECONDS = 10.0

_TYPES = {408: "invalid_request_error", 431: "invalid_request_error", 503: "service_unavailable"}


@dataclass
class ConnectionLimits:
    """What each connection of one listener may take; `max_connections` counts that listener's."""

    head_timeout: float = 15.0
    max_connections: int = 1024
    max_head_bytes: int = MAX_HEAD_BYTES
    _warned: dict[int, tuple[float, int]] = field(default_factory=dict, init=False, repr=False)

    def note_refusal(self, status: int, message: str) -> None:
        """Log a refused connection, at most once per `_WARN_EVERY_SECONDS` for each status."""
        now = time.monotonic()
        last, unsaid = self._warned.get(status, (-_WARN_EVERY_SECONDS, 0))
        if now - last < _WARN_EVERY_SECONDS:
            self._warned[status] = (last, unsaid + 1)
            return
        self._warned[status] = (now, 0)
        also = f" ({unsaid} more like it since the last such line)" if unsaid else ""
        log.warning("refused a connection with %d: %s%s", status, message, also)


def refusal_body(status: int, message: str) -> bytes:
    """An error body in OpenAI's shape, which llmctl's and the SDKs' error readers all read."""
    error = {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": None, "code": None}
    return json.dumps({"error": error}).encode()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the limits of `ConnectionLimits` on each connection."""

    def __init__(self, *args: Any, limits: ConnectionLimits | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits if limits is not None else ConnectionLimits()
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._read_size = 0  # the size of the read being parsed
        # The head being read: whether one has begun and is not complete, the reads it spans
        # (including the one it began in: at least its size), those after the one it began in
        # (all head: at most its size), and how much of it the parser has handed over.
        self._head_pending = False
        self._head_spans = 0
        self._head_after = 0
        self._sized_headers = 0
        self._sized_bytes = 0

    # ----- the connection -----

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = self.limits.max_connections
        if len(self.connections) > limit:
            message = (
                f"llmd already has {limit} connections open on this address, its limit ([server] "
                f"max_connections); try again once some have closed"
            )
            self._refuse(503, message, [(b"retry-after", b"1")])
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        size = self._read_size = len(data)
        if self._head_pending:
            self._head_spans += size
        super().data_received(data)
        if self._head_pending and not self.transport.is_closing():  # a head is still incomplete
            self._arm_head_timer()  # (a kept-alive connection's: idle until now, as uvicorn saw it)
            self._head_after += size
            limit = self.limits.max_head_bytes
            if self._head_spans > limit and self._head_lower_bound() > limit:
                self._refuse(431, self._too_large_message())

    # ----- the parser's callbacks -----

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_pending = True
        self._head_spans = self._read_size
        self._head_after = -self._read_size  # the rest of this read is counted after it
        self._sized_headers = self._sized_bytes = 0

    def on_headers_complete(self) -> None:
        self._head_pending = False
        if self._head_timer is not None:
            self._disarm_head_timer()
        limit = self.limits.max_head_bytes
        if self._head_spans > limit and self._head_lower_bound() > limit:
            # The whole head came at once: answer through the app, which uvicorn then closes after.
            message = self._too_large_message()
            self.limits.note_refusal(431, message)
            app, self.app = self.app, _Refusal(431, message)
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()

    # ----- helpers -----

    def _head_lower_bound(self) -> int:
        """Bytes of the pending head known to have arrived: what the parser handed over (the URL
        and every complete header), or every read after the one it began in, whichever is more."""
        headers = self.headers
        for index in range(self._sized_headers, len(headers)):
            name, value = headers[index]
            self._sized_bytes += len(name) + len(value) + 4  # ": " and CRLF
        self._sized_headers = len(headers)
        return max(self._head_after, len(self.url) + self._sized_bytes)

    def _too_large_message(self) -> str:
        return (
            f"the request's head (its request line and headers) is larger than "
            f"{self.limits.max_head_bytes // 1024} KiB; send fewer or shorter headers"
        )

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a pipelined head waits for the reply before it: not its fault
            return
        if not self._head_pending:
            self.transport.close()  # it never sent a byte: nobody to tell
            return
        self._refuse(408, (
            f"the request's head did not arrive within {self.limits.head_timeout:g}s "
            f"([server] head_timeout); send the request line and headers without pausing"
        ))

    def _refuse(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """Answer `status` and close the connection, parsing nothing more from it. Only where the
        parser is not running: after a read was parsed, or from a timer."""
        self._refused = True
        self._head_pending = False
        self._disarm_head_timer()
        self.limits.note_refusal(status, message)
        body = refusal_body(status, message)
        lines = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *(headers or [])]:
            lines += [name, b": ", value, b"\r\n"]
        lines += [
            b"content-type: application/json\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(lines))
        self.transport.close()


class _Refusal:
    """An ASGI app that answers every request with one error and closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.body = refusal_body(status, message)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})

"""A minimal HTTP/1.1 client on plain sockets, the same for every target.

The proxies are measured by the difference they make, so the client must add as little and as
steady a cost as possible, and exactly the same cost whichever target it talks to. A general
client library (its connection pool, header models, decoders) would add tens of microseconds of
Python per request and per chunk; this one sends a prebuilt request and parses only the framing
(Content-Length or chunked) and the server-sent-event boundaries.

`Connection.request` times one request on a keep-alive connection. `run_streams` drives many
streaming requests at once from a single thread with `selectors`, stamping each server-sent
event when the bytes completing it arrive.
"""

from __future__ import annotations

import json
import re
import selectors
import socket
import time
from dataclasses import dataclass, field

_TIMINGS_PREDICTED = re.compile(rb'"predicted_n"\s*:\s*(\d+)')
_TIMINGS_MS = re.compile(rb'"(prompt_ms|predicted_ms)"\s*:\s*([0-9.eE+-]+)')


class HttpError(Exception):
    """The server broke the protocol, closed early, or did not answer in time."""


def build_request(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: */*\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + body


def chat_body(model: str, max_tokens: int, *, stream: bool, prompt: str = "hi") -> bytes:
    """A chat request that always generates exactly `max_tokens` tokens."""
    return json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": stream,
        # Random weights may pick the end-of-text token at any step; every reply must be full length.
        "ignore_eos": True,
    }).encode()


class ResponseParser:
    """An incremental HTTP/1.1 response parser: `feed` bytes, get back the body bytes they carry.

    Handles Content-Length bodies, chunked transfer encoding, and bodies delimited by the
    connection closing. `done` is set once the whole response has been read.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = "head"
        self._remaining = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.done = False

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection", "").lower() != "close" and self._state != "until-close"

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while not self.done:
            if self._state == "head":
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                self._parse_head(bytes(self._buf[:end]))
                del self._buf[: end + 4]
            elif self._state == "length":
                take = min(self._remaining, len(self._buf))
                if take:
                    out.append(bytes(self._buf[:take]))
                    del self._buf[:take]
                    self._remaining -= take
                if self._remaining == 0:
                    self.done = True
                else:
                    break
            elif self._state == "chunk-size":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    break
                size_text = bytes(self._buf[:end]).split(b";", 1)[0].strip()
                del self._buf[: end + 2]
                try:
                    self._remaining = int(size_text, 16)
                except ValueError:
                    raise HttpError(f"bad chunk size {size_text!r}") from None
                self._state = "chunk-data" if self._remaining else "trailers"
            elif self._state == "chunk-data":
                take = min(self._remaining, len(self._buf))
                if take:
                    out.append(bytes(self._buf[:take]))
                    del self._buf[:take]
                    self._remaining -= take
                if self._remaining:
                    break
                self._state = "chunk-end"
            elif self._state == "chunk-end":
                if len(self._buf) < 2:
                    break
                if self._buf[:2] != b"\r\n":
                    raise HttpError("chunk not followed by CRLF")
                del self._buf[:2]
                self._state = "chunk-size"
            elif self._state == "trailers":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    break
                line = self._buf[:end]
                del self._buf[: end + 2]
                if not line:
                    self.done = True
            elif self._state == "until-close":
                if self._buf:
                    out.append(bytes(self._buf))
                    self._buf.clear()
                break
        return out

    def closed(self) -> None:
        """The server closed the connection: that ends a close-delimited body, and nothing else."""
        if self._state == "until-close":
            self.done = True
        elif not self.done:
            raise HttpError(f"connection closed mid-response (status {self.status}, state {self._state})")

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise HttpError(f"not an HTTP/1.x status line: {lines[0]!r}")
        self.status = int(parts[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._state = "chunk-size"
        elif "content-length" in self.headers:
            self._remaining = int(self.headers["content-length"])
            self._state = "length"
            if self._remaining == 0:
                self.done = True
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self.done = True
        else:
            self._state = "until-close"


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def get_status(host: str, port: int, path: str, timeout: float = 2.0) -> int | None:
    """The status of `GET path` on a new connection, or None if nothing accepts connections there.

    Cheap enough to poll every millisecond or two without taking much CPU from the process
    being waited for."""
    try:
        sock = _connect(host, port, timeout)
    except OSError:
        return None
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode("latin-1"))
        parser = ResponseParser()
        while not parser.status:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            parser.feed(chunk)
        return parser.status
    except OSError:
        return None
    finally:
        sock.close()


class Connection:
    """One keep-alive connection, reopened (outside the timed part) whenever the server closed it."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._sock: socket.socket | None = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(self, path: str, body: bytes) -> tuple[int, float, bytes]:
        """Send one POST; return (status, seconds from send to the last body byte, body)."""
        if self._sock is None:
            self._sock = _connect(self.host, self.port, self.timeout)
        sock = self._sock
        data = build_request(self.host, self.port, path, body)
        parser = ResponseParser()
        pieces: list[bytes] = []
        started = time.perf_counter()
        try:
            sock.sendall(data)
            while not parser.done:
                chunk = sock.recv(65536)
                if not chunk:
                    parser.closed()
                    break
                pieces += parser.feed(chunk)
        except (OSError, HttpError):
            self.close()
            raise
        elapsed = time.perf_counter() - started
        if not parser.keep_alive:
            self.close()
        return parser.status, elapsed, b"".join(pieces)


@dataclass
class Stream:
    """One streaming request: when it was sent and when each server-sent event completed."""

    sent_at: float = 0.0
    status: int = 0
    event_times: list[float] = field(default_factory=list)
    finished: bool = False
    tokens: int = 0
    # The engine's own time for the request (prompt and generation), from llama-server's `timings`.
    engine_seconds: float = 0.0
    error: str | None = None
    # The start of the body, to show what an error reply said.
    head: bytes = b""
    _tail: bytes = b""

    @property
    def first_event(self) -> float | None:
        return self.event_times[0] if self.event_times else None

    @property
    def gaps(self) -> list[float]:
        """Seconds between consecutive events."""
        times = self.event_times
        return [b - a for a, b in zip(times, times[1:])]

    def take(self, body: bytes, at: float) -> None:
        """Count the events this body piece completes, all stamped `at` (when it arrived)."""
        if len(self.head) < 500:
            self.head += body[: 500 - len(self.head)]
        data = self._tail + body
        complete = data.count(b"\n\n")
        if complete:
            cut = data.rfind(b"\n\n") + 2
            events, self._tail = data[:cut], data[cut:]
            self.event_times.extend([at] * complete)
            if b"data: [DONE]" in events:
                self.finished = True
            found = _TIMINGS_PREDICTED.search(events)
            if found:
                self.tokens = int(found.group(1))
                self.engine_seconds = sum(float(ms) for _, ms in _TIMINGS_MS.findall(events)) / 1000
        else:
            self._tail = data


def first_event(host: str, port: int, path: str, body: bytes, started: float, timeout: float = 600.0) -> float:
    """Send a streaming request on a new connection, read it to the end, and return the seconds
    from `started` (a `time.perf_counter()` reading) to its first server-sent event.

    llama-server sends its first event with the first generated token."""
    sock = _connect(host, port, timeout)
    stream, parser = Stream(), ResponseParser()
    try:
        sock.sendall(build_request(host, port, path, body))
        while not parser.done:
            chunk = sock.recv(65536)
            if not chunk:
                parser.closed()
                break
            now = time.perf_counter()
            for piece in parser.feed(chunk):
                stream.take(piece, now)
    finally:
        sock.close()
    if parser.status != 200 or stream.first_event is None:
        raise HttpError(f"streaming request answered {parser.status} with {len(stream.event_times)} events")
    return stream.first_event - started


def run_streams(host: str, port: int, path: str, body: bytes, clients: int, timeout: float = 600.0) -> list[Stream]:
    """Send `clients` copies of a streaming request at once; read all replies to the end.

    Connections are opened before the clock starts; every request is then sent back to back and
    the replies are read from one thread, so the client costs the same whatever answers.
    """
    socks = [_connect(host, port, timeout) for _ in range(clients)]
    data = build_request(host, port, path, body)
    streams = [Stream() for _ in socks]
    parsers = [ResponseParser() for _ in socks]
    selector = selectors.DefaultSelector()
    try:
        for i, sock in enumerate(socks):
            streams[i].sent_at = time.perf_counter()
            sock.sendall(data)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, i)
        open_count = clients
        deadline = time.perf_counter() + timeout
        while open_count:
            ready = selector.select(timeout=max(0.0, deadline - time.perf_counter()))
            if not ready:
                raise HttpError(f"{open_count} of {clients} streams did not finish within {timeout:.0f}s")
            for key, _ in ready:
                i = key.data
                sock = socks[i]
                try:
                    chunk = sock.recv(262144)
                except BlockingIOError:
                    continue
                now = time.perf_counter()
                parser, stream = parsers[i], streams[i]
                if chunk:
                    for piece in parser.feed(chunk):
                        stream.take(piece, now)
                else:
                    try:
                        parser.closed()
                    except HttpError as exc:
                        stream.error = str(exc)
                stream.status = parser.status
                if parser.done or not chunk:
                    selector.unregister(sock)
                    open_count -= 1
    finally:
        selector.close()
        for sock in socks:
            sock.close()
    return streams

"""HTTP/1.1 to llmd's management socket with the standard library's `http.client`.

llmctl sends one or two small requests per run and follows at most one streamed answer; a full
HTTP client library took longer to import than all the rest of llmctl (docs/cli.md, "Startup
time"). Each request opens its own connection, which is cheap on a unix socket.
"""

from __future__ import annotations

import contextlib
import http.client
import json as jsonlib
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

# The most one read of a streamed body waits for; whatever has arrived is handed on before that.
_READ_SIZE = 65536


class ConnectFailed(Exception):
    """Nothing accepted the connection; `__cause__` is the OSError that said why."""


class ConnectionLost(Exception):
    """The connection broke, or an answer took longer than the read timeout, after it was made."""


@contextlib.contextmanager
def _lost_on_error(chunked: bool = False) -> Iterator[None]:
    """Turn what `http.client` and the socket raise mid-exchange into ConnectionLost."""
    try:
        yield
    except http.client.RemoteDisconnected:
        raise ConnectionLost("Server disconnected without sending a response.") from None
    except http.client.IncompleteRead:
        how = " (incomplete chunked read)" if chunked else ""
        raise ConnectionLost(f"peer closed connection without sending complete message body{how}") from None
    except TimeoutError:
        raise ConnectionLost("timed out") from None
    except (OSError, http.client.HTTPException) as exc:
        raise ConnectionLost(str(exc) or type(exc).__name__) from None


class UnixConnection(http.client.HTTPConnection):
    """An HTTP connection over a unix socket: `timeout` bounds connecting, `read_timeout` each
    wait for the answer afterwards (None: as long as it takes)."""

    def __init__(self, path: str, timeout: float, read_timeout: float | None) -> None:
        super().__init__("llmd", timeout=timeout)
        self.socket_path = path
        self.read_timeout = read_timeout

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
            sock.settimeout(self.read_timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Response:
    """An answer: its status, and its body, read whole (`content`) or as it arrives (`iter_*`)."""

    def __init__(self, raw: http.client.HTTPResponse) -> None:
        self.status_code = raw.status
        self._raw = raw
        self._content: bytes | None = None

    def read(self) -> bytes:
        if self._content is None:
            with _lost_on_error(self._raw.chunked):
                self._content = self._raw.read()
        return self._content

    def header(self, name: str) -> str | None:
        """The value of the answer's header `name`, if it has one."""
        return self._raw.getheader(name)

    @property
    def content(self) -> bytes:
        return self.read()

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON; raises ValueError when it is not."""
        return jsonlib.loads(self.content)

    def iter_lines(self) -> Iterator[str]:
        """Each line as soon as it is complete, without its line ending."""
        while True:
            with _lost_on_error(self._raw.chunked):
                line = self._raw.readline()
            if not line:
                return
            yield line.decode("utf-8", errors="replace").rstrip("\r\n")

    def iter_raw(self) -> Iterator[bytes]:
        """The body's bytes as they arrive."""
        while True:
            with _lost_on_error(self._raw.chunked):
                chunk = self._raw.read1(_READ_SIZE)
            if not chunk:
                return
            yield chunk


class UnixClient:
    """Requests to the HTTP server on the unix socket at `path`. Raises ConnectFailed when
    nothing accepts the connection, ConnectionLost when it breaks or times out later."""

    def __init__(self, path: str, connect_timeout: float, read_timeout: float | None) -> None:
        self.path = path
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None) -> Response:
        """The answer, with its whole body read."""
        with self.stream(method, path, params=params, json=json) as response:
            response.read()
            return response

    @contextlib.contextmanager
    def stream(self, method: str, path: str, *, params: dict[str, Any] | None = None,
               json: Any = None) -> Iterator[Response]:
        """The answer with its body still to read; the connection closes when the block ends."""
        connection = UnixConnection(self.path, self.connect_timeout, self.read_timeout)
        try:
            try:
                connection.connect()
            except OSError as exc:
                raise ConnectFailed(f"cannot connect to {self.path}: {exc}") from exc
            target = f"{path}?{urlencode(params)}" if params else path
            headers: dict[str, str] = {}
            body: bytes | None = None
            if json is not None:
                # Strict JSON (no NaN), as compact as it can be.
                body = jsonlib.dumps(json, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
                headers["Content-Type"] = "application/json"
            with _lost_on_error():
                connection.request(method, target, body=body, headers=headers)
                raw = connection.getresponse()
            yield Response(raw)
        finally:
            connection.close()

"""The request log: the last `[server] request_log` requests the proxy served, kept in memory.

The metrics middleware (`metrics.RequestMetrics`) already times each request, reads its status
and the engine's token counts; when it finishes a request it hands the same facts here as one
`RequestRecord`, so the log costs one small object and one deque append per request and nothing
per chunk. Bodies are kept only with `[server] log_bodies = true`, cut to `MAX_BODY_BYTES` each.
Headers are never kept, so neither an API key nor the `Authorization` header can appear here.

`GET /v1/requests` (web/api.py), `llmctl requests` and the dashboard's requests page read it.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from llmd.daemon.http.anthropic_errors import ANTHROPIC_ROUTES
from llmd.daemon.http.ollama_errors import OLLAMA_ROUTES
from llmd.daemon.http.openai_errors import MODEL_ROUTES, MODELS_LIST_ROUTE
from llmd.drivers.base import OPENAI_RESPONSES

# The request and reply bodies of a logged request are each cut to this many bytes: enough for
# a prompt and its answer, while 200 requests still fit in a few MiB.
MAX_BODY_BYTES = 32 * 1024
DEFAULT_REQUEST_LOG = 200
# The most records `[server] request_log` may ask for.
MAX_REQUEST_LOG = 100_000
# A path is kept up to this many characters: clients probing for other servers send long ones.
MAX_PATH_CHARS = 200
# Which API each path the proxy serves belongs to; other paths are answered with a 404 and
# belong to none.
_APIS = {route: "openai" for route in (*MODEL_ROUTES, MODELS_LIST_ROUTE, OPENAI_RESPONSES)}
_APIS.update({route: "ollama" for route in OLLAMA_ROUTES})
_APIS.update({route: "anthropic" for route in ANTHROPIC_ROUTES})


def api_of(path: str) -> str | None:
    """The API a request's path belongs to ("openai", "ollama", "anthropic"), or None for a path llmd does not serve."""
    return _APIS.get(path)


def logged_path(path: str) -> str:
    return path if len(path) <= MAX_PATH_CHARS else path[:MAX_PATH_CHARS] + "..."


@dataclass(slots=True)
class RequestRecord:
    """One finished request, as the API shows it. Times are seconds; `time` is when it arrived
    (Unix time); `model` is the profile it reached, else the name the client asked for; `id`
    numbers the records in the order their requests finished."""

    time: float
    api: str | None
    method: str
    path: str
    model: str | None
    status: int
    client: str | None
    stream: bool
    ttft_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    duration_s: float
    error: str | None
    request_body: str | None = None
    response_body: str | None = None
    id: int = 0

    def to_json(self) -> dict[str, Any]:
        fields = asdict(self)
        return {"id": fields.pop("id"), **fields}


def body_text(data: bytes | bytearray, total: int) -> str:
    """A kept body as text: `data` is its first bytes, `total` its whole size."""
    text = bytes(data).decode("utf-8", "replace")
    if total > len(data):
        text += f"\n[... cut: {total} bytes in all, the first {len(data)} kept]"
    return text


class BodyCapture:
    """The first `MAX_BODY_BYTES` of a body, fed piece by piece; `total` counts every byte."""

    __slots__ = ("data", "total")

    def __init__(self) -> None:
        self.data = bytearray()
        self.total = 0

    def feed(self, piece: bytes) -> None:
        self.total += len(piece)
        room = MAX_BODY_BYTES - len(self.data)
        if room > 0:
            self.data += piece[:room]

    def text(self) -> str | None:
        return body_text(self.data, self.total) if self.total else None


class RequestLog:
    """The last `size` requests, oldest first; `size` 0 keeps none (`enabled` is then false)."""

    def __init__(self, size: int = DEFAULT_REQUEST_LOG, keep_bodies: bool = False) -> None:
        if size < 0:
            raise ValueError("a request log's size is 0 (off) or more")
        self.size = size
        self.keep_bodies = keep_bodies and size > 0
        self._records: deque[RequestRecord] = deque(maxlen=size)
        self._ids = itertools.count(1)

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def add(self, record: RequestRecord) -> None:
        record.id = next(self._ids)
        self._records.append(record)

    def newest(self, limit: int | None = None) -> list[RequestRecord]:
        """Up to `limit` records (all without one), newest first."""
        records = reversed(self._records)
        return list(records if limit is None else itertools.islice(records, limit))

    def after(self, last_id: int) -> list[RequestRecord]:
        """The records newer than the one numbered `last_id`, oldest first."""
        newer: list[RequestRecord] = []
        for record in reversed(self._records):
            if record.id <= last_id:
                break
            newer.append(record)
        newer.reverse()
        return newer

    def last_id(self) -> int:
        return self._records[-1].id if self._records else 0

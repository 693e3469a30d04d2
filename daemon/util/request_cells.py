"""How one record of the request log (`GET /v1/requests`) reads in a table: the same cells in
`llmctl requests` and on the dashboard's requests page. Standard library only: llmctl imports it."""

from __future__ import annotations

import time
from typing import Any

# The columns of a request table, in order.
COLUMNS = ("time", "api", "model", "endpoint", "status", "client", "ttft", "prompt", "generated", "duration")
_API_PREFIX = "/v1/"


def format_seconds(seconds: float | None) -> str:
    """"85 ms", "1.24 s", "2m05s"; "-" for None."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    whole = int(seconds)
    return f"{whole // 60}m{whole % 60:02d}s"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def request_cells(record: dict[str, Any]) -> dict[str, str]:
    """Each column's text for `record` (one object of `GET /v1/requests`). Times are local."""
    path = str(record["path"])
    status = str(record["status"])
    if record.get("error") in ("client_gone", "stream_broken"):
        status += f" ({record['error'].replace('_', ' ')})"
    return {
        "time": time.strftime("%H:%M:%S", time.localtime(record["time"])),
        "api": record.get("api") or "-",
        "model": record.get("model") or "-",
        "endpoint": path[len(_API_PREFIX):] if path.startswith(_API_PREFIX) else f"{record['method']} {path}",
        "status": status,
        "client": record.get("client") or "-",
        "ttft": format_seconds(record.get("ttft_s")),
        "prompt": _count(record.get("prompt_tokens")),
        "generated": _count(record.get("completion_tokens")),
        "duration": format_seconds(record.get("duration_s")),
    }


def full_time(record: dict[str, Any]) -> str:
    """When the request arrived, with the date: "2025-01-31 14:02:11"."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["time"]))

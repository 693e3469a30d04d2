"""Which management socket llmctl talks to when none is named: the first of the well-known
places that answers.

Where a daemon without a configured socket listens depends on the environment it was started
from ($XDG_RUNTIME_DIR, or a private /tmp dir without it), and llmctl's own environment may
differ: an SSH login has $XDG_RUNTIME_DIR, a daemon started from nohup or cron has not.
Connecting to a unix socket that nothing serves fails at once, so looking costs next to nothing.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# A daemon's listen backlog answers at once; only a flooded one would make a connect wait.
PROBE_TIMEOUT = 0.5


@dataclass(frozen=True)
class SocketChoice:
    """The socket to use, and the other places looked at, none of which answered (for the
    message should `path` not answer either)."""

    path: Path
    also_tried: tuple[Path, ...] = ()


def _probe(path: Path) -> str:
    """"ok" when something accepts a connection on `path`, "denied" when this user may not
    connect, "absent" otherwise."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(PROBE_TIMEOUT)
    try:
        sock.connect(str(path))
    except PermissionError:
        return "denied"
    except OSError:
        return "absent"
    finally:
        sock.close()
    return "ok"


def first_answering(candidates: Sequence[Path]) -> SocketChoice:
    """The first of `candidates` that accepts a connection. When none does: the first that
    refused this user (its "permission denied" then says which group to join), else the first."""
    unique = list(dict.fromkeys(candidates))
    denied: Path | None = None
    for path in unique:
        outcome = _probe(path)
        if outcome == "ok":
            return SocketChoice(path)
        if outcome == "denied" and denied is None:
            denied = path
    chosen = denied if denied is not None else unique[0]
    return SocketChoice(chosen, tuple(path for path in unique if path != chosen))

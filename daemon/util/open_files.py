"""The daemon's descriptor limit: every client connection, engine connection, log and pidfd is
one descriptor, and the soft limit a login shell hands out (often 1024) is far below what the
hard limit allows. The daemon raises its soft limit to the hard one when it starts, as servers
commonly do; the systemd unit sets both (LimitNOFILE)."""

from __future__ import annotations

import resource
from pathlib import Path

# The kernel's ceiling for any process's limit, which an unlimited hard limit stands for.
_NR_OPEN = Path("/proc/sys/fs/nr_open")


def _ceiling(hard: int) -> int:
    if hard != resource.RLIM_INFINITY:
        return hard
    try:
        return int(_NR_OPEN.read_text())
    except (OSError, ValueError):
        return 1024 * 1024


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit before and after
    (the same when it could not be raised, or needed no raising)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _ceiling(hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft

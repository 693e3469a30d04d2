"""The host as placement sees it: its RAM, and the cores llmd may give engines.

`read_host()` reads both now: `MemTotal`/`MemAvailable` through psutil, and the daemon's own
CPU affinity (`os.sched_getaffinity(0)`), so that an llmd started under `taskset`, a cgroup
cpuset or systemd's `CPUAffinity=` hands out only the cores it was given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

__all__ = ["HOST_RAM_MARGIN_MIB", "HostInfo", "read_host"]

_MIB = 1024 * 1024

# Host RAM kept free beyond llmd's claims: the desktop, the page cache engines read their
# weights through, the daemon itself.
HOST_RAM_MARGIN_MIB = 2048


@dataclass(frozen=True)
class HostInfo:
    """The host at one moment: RAM in MiB, and the cores llmd may use (sorted)."""

    total_mib: int
    available_mib: int
    cores: tuple[int, ...]
    # Kept free in the live ledger (see `cpu_plan.host_room`).
    margin_mib: int = HOST_RAM_MARGIN_MIB


def allowed_cores() -> tuple[int, ...]:
    """The cores this process may run on: those it hands out to engines."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux: every core the machine reports
        return tuple(range(os.cpu_count() or 1))


def read_host() -> HostInfo:
    """RAM and cores now; cheap enough to read on every placement."""
    memory = psutil.virtual_memory()
    return HostInfo(total_mib=memory.total // _MIB, available_mib=memory.available // _MIB, cores=allowed_cores())

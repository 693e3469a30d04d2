"""What an engine's processes are doing, read from /proc: the CPU time they have used and
whether one of them is stopped (SIGSTOP, a debugger's stop).

The health monitor asks this before it calls an engine hung: an unanswered probe on a saturated
machine may only be late, but a stopped process, or one whose CPU time stands still while its
probes go unanswered, is not slow but stuck.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Process states (/proc/PID/stat, field 3) of a process that cannot run until someone resumes it.
_STOPPED_STATES = frozenset("Tt")


@dataclass(frozen=True)
class ProcessActivity:
    """CPU seconds (user and system, all threads) the processes have used so far, and whether
    one of them is stopped. Processes that are gone count as neither."""

    cpu_seconds: float
    stopped: bool


def activity(pids: Iterable[int]) -> ProcessActivity:
    """Read the CPU time and state of `pids` (an engine and its children) from /proc."""
    cpu_ticks = 0
    stopped = False
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        stopped = stopped or fields[0] in _STOPPED_STATES
        cpu_ticks += int(fields[11]) + int(fields[12])  # utime and stime: fields 14 and 15
    return ProcessActivity(cpu_ticks / _CLOCK_TICKS, stopped)


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from its third field (the state) on; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or parentheses.
    return data[data.rindex(b")") + 2 :].decode("ascii", "replace").split()

"""The engines' reaper: a small process that stops what llmd's engines left running when llmd dies
without stopping them (a SIGKILL, a crash, the out-of-memory killer).

Each engine leads a process group of its own, and the kernel kills it when llmd dies
(PR_SET_PDEATHSIG), but not the processes it started: vLLM's engine core and its CPU workers
would run on, holding memory and cores, until the next start of llmd found them. So llmd starts
one reaper per owner tag, reading a pipe whose other end only llmd holds. llmd names each
engine's group on it as the engine starts ("+PGID") and again once the group is gone ("-PGID").
When the pipe ends, llmd is gone: the reaper SIGKILLs every process of a group still named that
carries llmd's owner tag in its environment (so a recycled group id never costs a stranger a
process), and exits.

A graceful stop of llmd stops every engine first, so its reaper then finds nothing to do.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

log = logging.getLogger(__name__)

# Run with `python -I -c`, arguments: the owner variable's "NAME=VALUE". It reads "+PGID" and
# "-PGID" lines until the pipe ends, then kills what is left.
_SCRIPT = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is for llmd, which stops its engines
tag = sys.argv[1].encode()
groups = set()
for line in sys.stdin:
    pgid = line[1:].strip()
    if pgid.isdigit():
        (groups.add if line.startswith("+") else groups.discard)(int(pgid))
for entry in os.listdir("/proc") if groups else ():
    if not entry.isdigit():
        continue
    try:
        with open(f"/proc/{entry}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        if int(fields[2]) not in groups:
            continue
        with open(f"/proc/{entry}/environ", "rb") as environ:
            if tag in environ.read().split(b"\0"):
                os.kill(int(entry), signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        continue
"""


class Reaper:
    """One reaper process and llmd's end of its pipe."""

    def __init__(self, owner_variable: str, owner: str) -> None:
        read_end, self._write_end = os.pipe()  # not inherited by engines: os.pipe is close-on-exec
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-c", _SCRIPT, f"{owner_variable}={owner}"],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
            )
        finally:
            os.close(read_end)
        self._broken = False

    def watch(self, pgid: int) -> None:
        """An engine's group to stop should llmd die."""
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        """The group is gone: its id may be reused by anyone."""
        self._send(f"-{pgid}\n")

    def _send(self, line: str) -> None:
        if self._broken:
            return
        try:
            os.write(self._write_end, line.encode())
        except OSError as exc:  # the reaper died (killed by hand, say): engines still die with llmd
            self._broken = True
            log.warning("the engines' reaper (pid %d) is gone (%s): engines' children may outlive a crash of llmd",
                        self.process.pid, exc.strerror or exc)


_reapers: dict[str, Reaper] = {}


def reaper_for(owner_variable: str, owner: str) -> Reaper:
    """The reaper of engines tagged `owner_variable=owner`, started on first use."""
    reaper = _reapers.get(owner)
    if reaper is None:
        reaper = _reapers[owner] = Reaper(owner_variable, owner)
    return reaper

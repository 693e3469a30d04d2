"""Log files that stay under a size cap: `RotatingLog` writes one, renaming it to `PATH.1` (and
`PATH.1` to `PATH.2`, ...) once it is full, and `LogFollower` reads one on as it grows, across
those renames, the way `tail -F` does.

An engine writes its output into a pipe, and a thread copies the pipe into a `RotatingLog`
(`copy_into`): the engine never waits on the disk, and no line is lost when the file rotates,
which would happen if the engine wrote to the file itself and the file were cut behind it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# The most read from an engine's pipe at once.
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class LogLimits:
    """How large a log file may grow, and how many full ones are kept besides it."""

    max_bytes: int
    keep: int

    @classmethod
    def from_mib(cls, max_mib: float, keep: int) -> LogLimits:
        return cls(max(1, int(max_mib * MIB)), keep)


def rotated(path: Path, number: int) -> Path:
    """`PATH.number`: the number-th newest full log beside `path`."""
    return path.with_name(f"{path.name}.{number}")


class RotatingLog:
    """An append-only file renamed aside before it would pass `limits.max_bytes`; the oldest
    beyond `limits.keep` is deleted. Writes go to the file as they come, cut at a line break, so
    that lines stay whole across files (a line longer than a file is cut where it must be).
    Not thread-safe: one writer."""

    def __init__(self, path: Path, limits: LogLimits) -> None:
        self.path = path
        self.limits = limits
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("ab")
        self._size = self._file.tell()

    def write(self, data: bytes) -> None:
        while data:
            room = self.limits.max_bytes - self._size
            if len(data) <= room:
                self._append(data)
                return
            # Fill the file up to the last line break that fits (a fresh file takes what fits even
            # without one), then go on in the next file.
            cut = data.rfind(b"\n", 0, room) + 1
            if not cut and not self._size:
                cut = room
            self._append(data[:cut])
            data = data[cut:]
            self.rotate()

    def _append(self, data: bytes) -> None:
        if data:
            self._file.write(data)
            self._file.flush()
            self._size += len(data)

    def rotate(self) -> None:
        """Rename the file to PATH.1 (shifting older ones up) and start an empty one."""
        self._file.close()
        keep = self.limits.keep
        if keep <= 0:
            self.path.unlink(missing_ok=True)
        else:
            rotated(self.path, keep).unlink(missing_ok=True)
            for number in range(keep - 1, 0, -1):
                if rotated(self.path, number).exists():
                    os.replace(rotated(self.path, number), rotated(self.path, number + 1))
            os.replace(self.path, rotated(self.path, 1))
        self._file = self.path.open("ab")
        self._size = 0

    def close(self) -> None:
        self._file.close()


def copy_into(read_fd: int, target: RotatingLog, name: str) -> threading.Thread:
    """Copy everything written to the pipe `read_fd` into `target`, in a thread of its own,
    until every writer has closed the pipe; then close both. A write that fails (a full disk)
    drops that output rather than stall the writer."""

    def run() -> None:
        failed = False
        try:
            while chunk := os.read(read_fd, _CHUNK):
                try:
                    target.write(chunk)
                    failed = False
                except OSError as exc:
                    if not failed:
                        log.warning("cannot write %s's log %s: %s; dropping its output until it can", name, target.path, exc)
                    failed = True
        finally:
            os.close(read_fd)
            target.close()

    thread = threading.Thread(target=run, name=f"log-{name}", daemon=True)
    thread.start()
    return thread


class LogFollower:
    """Reads what is appended to a log from `position` on, and goes on in the new file once the
    log is rotated (after the rest of the old one), or from the start once it is truncated."""

    def __init__(self, path: Path, position: int = 0) -> None:
        self.path = path
        self._file = None
        self._open(position)

    def _open(self, position: int) -> None:
        try:
            self._file = self.path.open("rb")
        except FileNotFoundError:
            self._file = None
            return
        size = os.fstat(self._file.fileno()).st_size
        self._file.seek(min(position, size))

    def read_new(self, limit: int = 4 * MIB) -> bytes:
        """What was written since the last call (at most about `limit` bytes at once)."""
        if self._file is None:
            self._open(0)
            if self._file is None:
                return b""
        data = self._file.read(limit)
        if data:
            return data
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return b""  # between a rotation's rename and the new file: look again next time
        mine = os.fstat(self._file.fileno())
        if (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
            self._file.close()  # rotated, and the old file is read to its end: on to the new one
            self._open(0)
            return self._file.read(limit) if self._file is not None else b""
        if current.st_size < self._file.tell():  # truncated in place: start over
            self._file.seek(0)
            return self._file.read(limit)
        return b""

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

"""Reading llmd's own state files (the pid ledger, measured VRAM, bench results, caches) so that
a damaged one never stops the daemon.

Every such file is only a memory of earlier runs: llmd works without it, just less well
informed. So a file that cannot be used (not JSON, the wrong shape, values that make no sense,
unreadable, or not a file at all) is reported in the log by name, moved aside to
`NAME.corrupt-TIMESTAMP` for a person to look at, and the caller goes on as if it were absent.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Far above any state file llmd writes; a larger one is not read into memory at all.
MAX_STATE_BYTES = 16 * 1024 * 1024


class BadState(ValueError):
    """A state file's content has the wrong shape or a value that makes no sense; the message
    says which."""


def read_state(path: Path, parse: Callable[[Any], T], *, max_bytes: int = MAX_STATE_BYTES) -> T | None:
    """`parse` of the JSON in `path`; None when the file does not exist, or cannot be used.

    `parse` gets the decoded JSON value and raises BadState (or ValueError, TypeError, KeyError)
    when its shape or values are wrong. A file that cannot be used is logged with its path and
    the reason, and moved aside (see the module's doc), so the next read starts clean.
    """
    try:
        raw = _read_regular_file(path, max_bytes)
    except FileNotFoundError:
        return None
    except (OSError, _NotAFile) as exc:
        quarantine(path, _reason(exc))
        return None
    try:
        return parse(json.loads(raw))
    except UnicodeDecodeError:
        quarantine(path, "not UTF-8 text")
    except json.JSONDecodeError as exc:
        quarantine(path, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        quarantine(path, f"unexpected content ({_reason(exc)})")
    return None


def quarantine(path: Path, reason: str) -> Path | None:
    """Warn that `path` cannot be used and why, and move it aside; returns where it went, or None
    when it could not be moved (it is then left, and the warning says so)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    number = 1
    while os.path.lexists(aside):
        number += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{number}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None  # already gone: another reader moved it
    except OSError as exc:
        log.warning("ignoring state file %s: %s; it could not be moved aside (%s), so fix or delete it",
                    path, reason, exc.strerror or exc)
        return None
    log.warning("ignoring state file %s: %s; moved it aside to %s and going on without it", path, reason, aside.name)
    return aside


class _NotAFile(Exception):
    """Something other than a regular file (a directory, a FIFO, a device) has the file's name."""


def _read_regular_file(path: Path, max_bytes: int) -> bytes:
    # O_NONBLOCK: opening a FIFO for reading must not wait for a writer that never comes.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _NotAFile(f"not a regular file (mode {stat.filemode(info.st_mode)})")
        if info.st_size > max_bytes:
            raise _NotAFile(f"{info.st_size} bytes, more than any state file llmd writes ({max_bytes})")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read it: {exc.strerror}"
    if isinstance(exc, KeyError):
        return f"missing {exc}"
    return str(exc) or type(exc).__name__


# ----- small checks for the parsers -----


def expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """`value` if it is of `kind` (a bool is never taken for a number); else BadState naming `what`."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise BadState(f"{what} is {value!r}, not {_names(kinds)}")
    if not isinstance(value, kinds):
        found = "null" if value is None else _names((type(value),))
        raise BadState(f"{what} is {found}, not {_names(kinds)}")
    return value


def expect_number(value: Any, what: str, *, minimum: float = 0, integer: bool = False) -> Any:
    """`value` if it is a finite number (an integer, with `integer`) of at least `minimum`; else
    BadState naming `what`."""
    expect(value, int if integer else (int, float), what)
    if not (value >= minimum and value != float("inf")):  # also false for NaN
        kind = "an integer" if integer else "a number"
        raise BadState(f"{what} is {value!r}, not {kind} of at least {minimum:g}")
    return value


def _names(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list", bool: "true or false"}
    return " or ".join(names.get(kind, kind.__name__) for kind in kinds)

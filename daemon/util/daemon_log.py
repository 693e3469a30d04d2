"""The daemon's own log file, beside its output to stderr (the journal, under systemd): a
rotating file under a size cap, so a long-running daemon never fills the disk with it."""

from __future__ import annotations

import logging
from logging.handlers import RotatingFileHandler
from pathlib import Path

from llmd.daemon.util.rotating_log import LogLimits

log = logging.getLogger(__name__)

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class DaemonLogFile(RotatingFileHandler):
    """The handler of the daemon's log file (a type of its own, so that a reload finds it)."""


def log_to_file(path: Path, limits: LogLimits) -> DaemonLogFile | None:
    """Also write the daemon's log to `path`, rotated at `limits`; None (and a warning on
    stderr) when the file cannot be opened: the daemon runs on without it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = DaemonLogFile(path, maxBytes=limits.max_bytes, backupCount=limits.keep, encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write the daemon's log to %s: %s; logging to stderr only", path, exc)
        return None
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def set_limits(limits: LogLimits) -> None:
    """Apply new limits (a reload) to the daemon's log file, if it has one."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, DaemonLogFile):
            handler.maxBytes = limits.max_bytes
            handler.backupCount = limits.keep

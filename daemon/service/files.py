"""Writing the service's files only when they differ, so a second install touches nothing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from llmd.daemon.util.atomic_write import write_atomic

FILE_MODE = 0o644


def ensure_file(path: Path, content: str, mode: int = FILE_MODE) -> str:
    """Make `path` hold `content` with `mode`; says "created", "updated", "mode fixed" or "unchanged"."""
    wanted = content.encode()
    try:
        current = path.read_bytes()
        current_mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        current, current_mode = None, None
    if current == wanted:
        if current_mode == mode:
            return "unchanged"
        os.chmod(path, mode)
        return f"mode fixed ({mode:04o})"
    write_atomic(path, wanted)
    os.chmod(path, mode)  # the scratch file got the umask's mode
    return "created" if current is None else "updated"


def create_once(path: Path, content: str, mode: int = FILE_MODE) -> bool:
    """Write `path` only if it does not exist (an edited config is never replaced); True if written."""
    # Looked at first: the atomic write's scratch file would change the directory's mtime even
    # when the write is refused.
    if os.path.lexists(path):
        return False
    try:
        write_atomic(path, content, overwrite=False)
    except FileExistsError:
        return False
    os.chmod(path, mode)
    return True


def remove_file(path: Path) -> bool:
    """Remove `path` (a file or a link); False if there was nothing there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True

"""Finding the llmd (and llmctl) that is running, for the unit's ExecStart and the engine builds."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

from llmd.daemon.service.tools import ServiceSetupError


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def this_llmd() -> Path:
    """The absolute path of the `llmd` executable running now.

    sys.argv[0] is that script when llmd was started by name or path (a link, as pipx makes in
    ~/.local/bin, is followed to the venv's own script). Started some other way, the script
    beside the interpreter is the one: in a venv that is VENV/bin/llmd, and the interpreter's
    path is deliberately not resolved, since a venv's python is a link out of the venv.
    """
    argv0 = Path(sys.argv[0])
    candidates = [argv0.resolve()] if argv0.name == "llmd" else []
    candidates.append(Path(os.path.abspath(Path(sys.executable).parent / "llmd")))
    found = shutil.which("llmd")
    if found is not None:
        candidates.append(Path(found).resolve())
    for candidate in candidates:
        if _is_executable(candidate):
            return candidate
    raise ServiceSetupError("cannot find the llmd executable that is running; start it by its full path, e.g. /opt/llmd/bin/llmd install")


def sibling_llmctl(llmd: Path) -> Path:
    """The llmctl installed beside `llmd`."""
    llmctl = llmd.with_name("llmctl")
    if not _is_executable(llmctl):
        raise ServiceSetupError(f"{llmctl} is missing: llmd and llmctl come from the same package; reinstall it")
    return llmctl


# The unit's ProtectHome=yes hides these from the service, whatever their modes.
HIDDEN_FROM_SERVICE = (Path("/home"), Path("/root"), Path("/run/user"))


def hidden_from_service(path: Path) -> Path | None:
    """The directory of `HIDDEN_FROM_SERVICE` that holds `path`, or None."""
    return next((top for top in HIDDEN_FROM_SERVICE if path.is_relative_to(top)), None)


def unreachable_by_others(path: Path) -> Path | None:
    """The first directory above `path` (or `path` itself) that a user other than its owner cannot
    pass through or run, e.g. a venv under /root; None when the llmd user can run `path`."""
    for directory in reversed(path.parents):
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            return directory
    mode = os.stat(path).st_mode
    return None if mode & stat.S_IXOTH and mode & stat.S_IROTH else path

"""llmd's directories, made by systemd-tmpfiles from the shipped tmpfiles.d snippet."""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from llmd.daemon.service.layout import TMPFILES_SNIPPET, Target
from llmd.daemon.service.tools import run_tool


@dataclass(frozen=True)
class DeclaredDirectory:
    """One `d` line of a tmpfiles.d snippet."""

    path: Path
    mode: int
    user: str
    group: str


def declared_directories(snippet: str) -> list[DeclaredDirectory]:
    """The `d` lines of `snippet`, in order (parents before children, as the snippet lists them)."""
    declared = []
    for line in snippet.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0] == "d":
            declared.append(DeclaredDirectory(Path(fields[1]), int(fields[2], 8), fields[3], fields[4]))
    return declared


def _state(path: Path) -> tuple[int, int, int] | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid


def create_directories(target: Target, snippet: str) -> list[str]:
    """Run `systemd-tmpfiles --create` on the installed snippet; says what happened to each directory."""
    declared = declared_directories(snippet)
    before = {d.path: _state(target.path(d.path)) for d in declared}
    run_tool(["systemd-tmpfiles", "--create", *target.root_option(), TMPFILES_SNIPPET.name])
    said = []
    for d in declared:
        after = _state(target.path(d.path))
        shown = target.path(d.path)
        owner = f"{d.mode:04o} {d.user}:{d.group}"
        if after is None:
            said.append(f"{shown}: missing after systemd-tmpfiles (see its config)")
        elif before[d.path] is None:
            said.append(f"{shown}: created ({owner})")
        elif before[d.path] != after:
            said.append(f"{shown}: mode or owner fixed ({owner})")
        else:
            said.append(f"{shown}: unchanged")
    return said


def top_directories(snippet: str) -> list[Path]:
    """The declared directories not inside another declared one: what --purge removes."""
    paths = [d.path for d in declared_directories(snippet)]
    return [p for p in paths if not any(other != p and other in p.parents for other in paths)]


def remove_tree(path: Path) -> bool:
    """Remove the directory `path` and everything in it; False if it did not exist."""
    if not os.path.lexists(path):
        return False
    shutil.rmtree(path)
    return True

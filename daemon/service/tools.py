"""Running systemd's tools (and runuser, userdel) with errors a person can act on."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from llmd.daemon.errors import LlmdError


class ServiceSetupError(LlmdError):
    """A step of `llmd install` or `llmd uninstall` could not be done."""


def run_tool(argv: Sequence[str], *, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `argv` with its output captured; with `check`, a non-zero exit raises ServiceSetupError."""
    if shutil.which(argv[0]) is None:
        raise ServiceSetupError(f"{argv[0]} is not installed; llmd install needs systemd's tools")
    result = subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise ServiceSetupError(f"`{shlex.join(argv)}` failed (exit {result.returncode})" + (f": {detail}" if detail else ""))
    return result


def run_tool_live(argv: Sequence[str], *, cwd: Path | None = None) -> None:
    """Run `argv` with its output going straight to the terminal (long builds show their progress)."""
    if shutil.which(argv[0]) is None:
        raise ServiceSetupError(f"{argv[0]} is not installed")
    code = subprocess.run(list(argv), cwd=cwd).returncode
    if code != 0:
        raise ServiceSetupError(f"`{shlex.join(argv)}` failed (exit {code}); its output is above")


def tool_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """What a tool said (systemd's tools report on stderr), one entry a line."""
    return [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]


def systemd_is_running() -> bool:
    """sd_booted(): systemd is PID 1 here, so systemctl can reload, start and stop units."""
    return os.path.isdir("/run/systemd/system")

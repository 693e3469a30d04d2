"""systemctl for the llmd unit, on the running system or (offline) on a root."""

from __future__ import annotations

import subprocess

from llmd.daemon.service.layout import UNIT_NAME, Target
from llmd.daemon.service.tools import run_tool


def systemctl(target: Target, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`systemctl [--root=DIR] ARGUMENTS...`."""
    return run_tool(["systemctl", *target.root_option(), *arguments], check=check)


def is_enabled(target: Target) -> bool:
    """Whether the unit is enabled; works offline on a root, where it reads the wants links."""
    state = systemctl(target, "is-enabled", UNIT_NAME, check=False).stdout.strip()
    return state in ("enabled", "enabled-runtime")


def is_active(target: Target) -> bool:
    """Whether the service is running (the running system only)."""
    return systemctl(target, "is-active", UNIT_NAME, check=False).stdout.strip() in ("active", "activating", "reloading")


def enable(target: Target) -> str:
    if is_enabled(target):
        return f"{UNIT_NAME}: already enabled"
    systemctl(target, "enable", UNIT_NAME)
    return f"{UNIT_NAME}: enabled (starts at boot)"


def start(target: Target, *, unit_changed: bool) -> str:
    """Start the service, or restart it when its unit changed under a running llmd."""
    if not is_active(target):
        systemctl(target, "start", UNIT_NAME)
        return f"{UNIT_NAME}: started"
    if unit_changed:
        systemctl(target, "restart", UNIT_NAME)
        return f"{UNIT_NAME}: restarted (its unit changed)"
    return f"{UNIT_NAME}: already running"


def stop_and_disable(target: Target) -> list[str]:
    said = []
    if target.live and is_active(target):
        systemctl(target, "stop", UNIT_NAME)
        said.append(f"{UNIT_NAME}: stopped")
    if is_enabled(target):
        systemctl(target, "disable", UNIT_NAME)
        said.append(f"{UNIT_NAME}: disabled")
    return said or [f"{UNIT_NAME}: not running or enabled"]

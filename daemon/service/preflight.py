"""What `llmd install` and `llmd uninstall` check before they change anything."""

from __future__ import annotations

import os
from pathlib import Path

from llmd.daemon.service.layout import Target
from llmd.daemon.service.tools import ServiceSetupError, systemd_is_running


def check_can_change(target: Target, llmd: Path, command: str) -> None:
    """Refuse early, before any change: the running system needs root and a running systemd."""
    if not target.live:
        return
    if os.geteuid() != 0:
        raise ServiceSetupError(
            f"llmd {command} changes the system (a user, /etc, systemd units): run it as root, "
            f"e.g. `sudo {llmd} {command}` (or pass --root DIR to fill an image instead)"
        )
    if not systemd_is_running():
        raise ServiceSetupError(
            "systemd is not running on this machine (no /run/systemd/system); "
            "pass --root DIR to set up an image or a tree without it"
        )

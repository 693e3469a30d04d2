"""The warning `llmd serve` and `llmctl engines install` give when run as root.

Neither needs root. Run as root, `llmd serve` starts engines that parse model files and run
their Python packages with every privilege, and `llmctl engines install` runs pip and cmake
builds likewise; a flaw in any of them then owns the machine. Both still run (containers and CI
run as root), after saying so once.
"""

from __future__ import annotations

import os

from llmd.daemon.service.layout import SERVICE_USER


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def root_warning(command: str, why: str) -> str | None:
    """What to say when `command` runs as root, because of `why`; None for any other user."""
    if not running_as_root():
        return None
    return (
        f"{command} is running as root: {why} with every privilege. Run it as an unprivileged "
        f"user instead, such as the `{SERVICE_USER}` service user that `llmd install` creates "
        f"(`sudo -u {SERVICE_USER} ...`), or your own user (`llmd init`)."
    )

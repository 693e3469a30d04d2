"""A `systemctl --user` unit for llmd run by a user without root (`llmd init` writes it).

Under the user's systemd, llmd gets the session's $XDG_RUNTIME_DIR (/run/user/UID), so its
socket is where `llmctl` looks first, and it restarts on failure like the system service.
"""

from __future__ import annotations

import os
from pathlib import Path

UNIT_NAME = "llmd.service"


def user_unit_path() -> Path:
    """~/.config/systemd/user/llmd.service (under $XDG_CONFIG_HOME when set)."""
    base = os.environ.get("XDG_CONFIG_HOME")
    return (Path(base) if base else Path.home() / ".config") / "systemd" / "user" / UNIT_NAME


def _quoted(path: Path) -> str:
    """A path as one word of a unit's command line."""
    text = str(path)
    if not any(char in text for char in ' "\\\'$%'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$").replace("%", "%%") + '"'


def user_unit_text(llmd: Path, config: Path) -> str:
    return f"""\
# llmd for this user, written by `llmd init`. Start it now and at every login:
#   systemctl --user daemon-reload && systemctl --user enable --now llmd
# Keep it running after you log out: loginctl enable-linger $USER
[Unit]
Description=llmd: local LLM engines behind one OpenAI-compatible address (this user's)
After=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={_quoted(llmd)} serve --config {_quoted(config)}
# Re-reads llmd.toml and the profiles; only models whose profile changed restart.
ExecReload=/bin/kill -HUP $MAINPID
# A hung event loop stops the pings; systemd then restarts llmd.
WatchdogSec=30
Restart=on-failure
RestartSec=2
# llmd stops its engines itself on SIGTERM; SIGKILL for what is left after TimeoutStopSec.
KillMode=mixed
TimeoutStopSec=90

[Install]
WantedBy=default.target
"""

"""Where llmd's files are when `llmd.toml` does not say: the config, the socket, state and engines.

Run as a service, the config names system paths. Run by a user with no config, every path
defaults to that user's XDG directories, so llmd needs no root. This module needs nothing but
the standard library, so `llmctl` finds the socket without loading the config's validation.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_ENV = "LLMD_CONFIG"
SOCKET_ENV = "LLMD_SOCKET"
ENGINES_DIR_ENV = "LLMD_ENGINES_DIR"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def runtime_dir() -> Path:
    """Where the management socket lives by default: $XDG_RUNTIME_DIR/llmd, else a private /tmp dir."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "llmd" if base else Path(f"/tmp/llmd-{os.getuid()}")


def default_state_dir() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / "llmd"


def default_config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "llmd"


def default_engines_dir() -> Path:
    """Built engines live outside any checkout or venv, keyed by version, and outlive upgrades of llmd."""
    override = os.environ.get(ENGINES_DIR_ENV)
    if override:
        return Path(override)
    return _xdg("XDG_DATA_HOME", ".local/share") / "llmd" / "engines"


def default_socket() -> Path:
    override = os.environ.get(SOCKET_ENV)
    return Path(override) if override else runtime_dir() / "llmd.sock"


# The socket of the system service (`llmd install`, /etc/llmd/llmd.toml).
SYSTEM_SOCKET = Path("/run/llmd/llmd.sock")


def well_known_sockets() -> list[Path]:
    """Where a daemon of this user listens when no config names its socket, whatever the
    environment it was started from: a login session's runtime dir, systemd's per-user one,
    the private /tmp dir a daemon started without $XDG_RUNTIME_DIR (nohup, cron) uses; then
    the system service's socket. Without duplicates, in that order."""
    uid = os.getuid()
    found: list[Path] = []
    base = os.environ.get("XDG_RUNTIME_DIR")
    for candidate in (
        Path(base) / "llmd" / "llmd.sock" if base else None,
        Path(f"/run/user/{uid}/llmd/llmd.sock"),
        Path(f"/tmp/llmd-{uid}/llmd.sock"),
        SYSTEM_SOCKET,
    ):
        if candidate is not None and candidate not in found:
            found.append(candidate)
    return found


def config_path_from_env(explicit: Path | None) -> Path | None:
    """The config to read: --config, else $LLMD_CONFIG, else the user's config if it exists."""
    if explicit is not None:
        return explicit
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    candidate = default_config_dir() / "llmd.toml"
    return candidate if candidate.exists() else None

"""Re-reading llmd.toml and the profiles while running: on SIGHUP, or `POST /v1/reload` (profiles only)."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Mapping
from pathlib import Path

import anyio

from llmd.drivers.base import Driver

from llmd.daemon.config import DaemonConfig, load_config
from llmd.daemon.errors import LlmdError
from llmd.daemon.manager.core import Manager
from llmd.daemon.models.profiles import ProfileSet, embedding_engines_of, kv_engines_of, load_profiles
from llmd.daemon.util.daemon_log import set_limits
from llmd.daemon.util.rotating_log import LogLimits
from llmd.daemon.util.sdnotify import notify

log = logging.getLogger(__name__)

# Settings bound at startup: a change to them is reported, and takes effect at the next start.
_NEEDS_RESTART = (
    "listen", "socket", "state_dir", "management_listen", "api_keys", "management_token", "request_log", "log_bodies",
)
# Whole sections read once, when the listeners' apps are built.
_SECTIONS_NEEDING_RESTART = ("metrics", "dashboard")


# How the reload's log line names each kind of change (`Manager.reload`).
_CHANGE_WORDS = {
    "added": "added",
    "restarted": "changed (engine restarted)",
    "updated": "changed (applied without a restart)",
    "stopped": "stopped (parked engine whose profile changed)",
    "kept": "kept on its last good version (the profile is invalid)",
    "removed": "removed",
}


def read_profiles(config: DaemonConfig, drivers: Mapping[str, Driver]) -> ProfileSet:
    """The daemon's profiles, checked against the installed drivers and with their local model
    files required; each problem is logged (a missing profile directory, an invalid file)."""
    server = config.server
    profiles = load_profiles(
        server.profile_dirs, set(drivers), server.model_dirs, kv_engines_of(drivers),
        embedding_engines=embedding_engines_of(drivers), require_model_files=True,
    )
    for directory in profiles.missing_dirs:
        log.warning(
            "profile directory %s does not exist, so no profiles are read from it; create it (`llmd init`) "
            "or fix [server] profile_dirs in llmd.toml", directory,
        )
    for error in profiles.errors.values():
        log.error("skipping invalid profile: %s", error)
    return profiles


def reload_profiles(manager: Manager, config: DaemonConfig) -> tuple[ProfileSet, dict[str, list[str]]]:
    """Read the profiles from `config`'s dirs and hand them to the manager, which restarts only
    the models whose engine settings changed. Returns the profiles found and what changed."""
    profiles = read_profiles(config, manager.drivers)
    changes = manager.reload(config, profiles)
    summary = "; ".join(
        f"{_CHANGE_WORDS.get(what, what)}: {', '.join(names)}" for what, names in changes.items() if names
    ) or "nothing changed"
    valid = len(profiles.profiles) - len(profiles.kept)
    log.info("reloaded %d profiles (%d invalid): %s", valid, len(profiles.errors), summary)
    return profiles, changes


def reload_now(manager: Manager, config_path: Path | None) -> None:
    """Apply the current files; on any error keep everything as it was and log why."""
    notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
    try:
        config = load_config(config_path)
    except LlmdError as exc:
        log.error("reload failed, keeping the running config: %s", exc)
        notify("READY=1")
        return
    for key in _NEEDS_RESTART:
        if getattr(config.server, key, None) != getattr(manager.config.server, key, None):
            log.warning("[server] %s changed: it takes effect when llmd restarts", key)
            setattr(config.server, key, getattr(manager.config.server, key, None))
    if config.gpus.simulate != manager.config.gpus.simulate:
        log.warning("[gpus] simulate changed: it takes effect when llmd restarts")
        config.gpus.simulate = manager.config.gpus.simulate
    for section in _SECTIONS_NEEDING_RESTART:
        if getattr(config, section) != getattr(manager.config, section):
            log.warning("[%s] changed: it takes effect when llmd restarts", section)
            setattr(config, section, getattr(manager.config, section))
    set_limits(LogLimits.from_mib(config.server.log_max_mib, config.server.log_keep))
    profiles, _ = reload_profiles(manager, config)
    notify("READY=1", f"STATUS=reloaded: {len(profiles.profiles)} profiles")


async def reload_on_sighup(manager: Manager, config_path: Path | None) -> None:
    with anyio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            reload_now(manager, config_path)

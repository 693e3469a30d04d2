"""`GET /v1/status`: who this daemon is and where to reach it, for `llmctl status`.

Its pid, version and uptime; the address OpenAI clients should use; the management socket and
listener; the dashboard (or how to turn it on); the config it read, its profile and engines
directories; and the models that hold an engine now.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from llmd.daemon.util.loopback import is_loopback_host, reachable_url
from llmd.daemon.version import llmd_version
from llmd.daemon.web.dashboard_where import dashboard_location

if TYPE_CHECKING:
    from llmd.daemon.manager.core import Manager

# States in which a model holds an engine process (or is about to).
_RUNNING = ("starting", "ready", "sleeping", "stopping")


def daemon_status(manager: Manager, config_path: Path | None) -> dict[str, Any]:
    config = manager.config
    server = config.server
    started = psutil.Process().create_time()
    openai_url = reachable_url(server.listen_host, server.listen_port) + "/v1"
    # From other hosts, a wildcard address is reached by this host's name.
    remote_url = None
    if not is_loopback_host(server.listen_host):
        host = socket.gethostname() if server.listen_host in ("0.0.0.0", "::", "") else server.listen_host
        remote_url = reachable_url(host, server.listen_port) + "/v1"
    models = [
        {key: row[key] for key in ("model", "engine", "state", "pid", "port")}
        for row in manager.status()
        if row["state"] in _RUNNING
    ]
    return {
        "pid": os.getpid(),
        "version": llmd_version(),
        "uptime_s": round(max(0.0, time.time() - started), 1),
        "config": str(config_path) if config_path is not None else None,
        "listen": server.listen,
        "openai_url": openai_url,
        "openai_url_remote": remote_url,
        "api_key_required": bool(server.api_keys),
        "socket": str(server.socket),
        "management_listen": server.management_listen,
        "dashboard": dashboard_location(config).as_dict(),
        "profile_dirs": [str(path) for path in server.profile_dirs],
        "profiles": len(manager.profiles.profiles),
        "invalid_profiles": len(manager.profiles.errors),
        "engines_dir": str(server.engines_dir),
        "state_dir": str(server.state_dir),
        "models": models,
    }

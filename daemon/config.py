"""The daemon's own settings, `llmd.toml`.

Run as a service, the config names system paths. Run by a user with no config, every path
defaults to that user's XDG directories, so llmd needs no root.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .validation import read_toml, validate_file_data

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


_Strict = ConfigDict(extra="forbid")
PositiveSeconds = Annotated[float, Field(gt=0, le=86400)]


class ServerConfig(BaseModel):
    model_config = _Strict

    listen: str = "127.0.0.1:8808"
    socket: Path = Field(default_factory=default_socket)
    state_dir: Path = Field(default_factory=default_state_dir)
    profile_dirs: list[Path] = Field(default_factory=lambda: [default_config_dir() / "profiles"])
    engines_dir: Path = Field(default_factory=default_engines_dir)
    # How long an engine may take from spawn to ready before the load fails.
    ready_timeout: PositiveSeconds = 600.0
    # Grace between SIGTERM and SIGKILL when stopping an engine's process group.
    stop_grace: PositiveSeconds = 10.0
    # How long in-flight requests may run on after SIGTERM before they are cut.
    shutdown_grace: PositiveSeconds = 30.0
    # How long a request waits for room on the GPUs (busy models finishing) before a 503.
    queue_timeout: PositiveSeconds = 60.0

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError('listen must be "HOST:PORT", like "127.0.0.1:8808"')
        return value

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class EngineConfig(BaseModel):
    model_config = _Strict

    # argv prefix before the model arguments; looked up on PATH unless absolute.
    command: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("command")
    @classmethod
    def _non_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not all(part.strip() for part in value)):
            raise ValueError('command must be a non-empty list of non-empty strings, like ["llama-server"]')
        return value


class GpusConfig(BaseModel):
    model_config = _Strict

    # A JSON snapshot of GPUs to use instead of NVML (tests, dry runs, planning).
    simulate: Path | None = None
    # Kept free on every card beyond what NVML reports in use (allocator slack, other programs).
    margin_mib: Annotated[int, Field(ge=0, le=1_048_576)] = 512
    # How long to wait after stopping an engine for NVML to show its memory released.
    release_timeout: PositiveSeconds = 30.0


class DaemonConfig(BaseModel):
    model_config = _Strict

    server: ServerConfig = Field(default_factory=ServerConfig)
    engines: dict[str, EngineConfig] = Field(default_factory=dict)
    gpus: GpusConfig = Field(default_factory=GpusConfig)

    def engine(self, name: str) -> EngineConfig:
        return self.engines.get(name) or EngineConfig()

    @property
    def logs_dir(self) -> Path:
        return self.server.state_dir / "logs"


def config_path_from_env(explicit: Path | None) -> Path | None:
    """The config to read: --config, else $LLMD_CONFIG, else the user's config if it exists."""
    if explicit is not None:
        return explicit
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    candidate = default_config_dir() / "llmd.toml"
    return candidate if candidate.exists() else None


def load_config(path: Path | None) -> DaemonConfig:
    """Read and validate `llmd.toml`; with no path, the XDG defaults. Relative paths resolve against the file."""
    if path is None:
        return DaemonConfig()
    data = read_toml(path)
    config: DaemonConfig = validate_file_data(DaemonConfig, path, data)
    base = path.parent
    server = config.server
    server.socket = (base / server.socket).resolve() if not server.socket.is_absolute() else server.socket
    server.state_dir = base / server.state_dir if not server.state_dir.is_absolute() else server.state_dir
    server.profile_dirs = [d if d.is_absolute() else base / d for d in server.profile_dirs]
    if config.gpus.simulate is not None and not config.gpus.simulate.is_absolute():
        config.gpus.simulate = base / config.gpus.simulate
    return config

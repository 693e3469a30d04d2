"""The daemon's own settings, `llmd.toml`.

Run as a service, the config names system paths. Run by a user with no config, every path
defaults to that user's XDG directories (`config_paths`), so llmd needs no root.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

# The path defaults are re-exported: the daemon and its tests import them from here.
from llmd.daemon.config_paths import (  # noqa: F401
    CONFIG_ENV,
    ENGINES_DIR_ENV,
    SOCKET_ENV,
    config_path_from_env,
    default_config_dir,
    default_engines_dir,
    default_socket,
    default_state_dir,
    runtime_dir,
)
from llmd.daemon.util.validation import read_toml, validate_file_data

_Strict = ConfigDict(extra="forbid")
PositiveSeconds = Annotated[float, Field(gt=0, le=86400)]
# How long a dashboard login may last: up to a year.
SessionSeconds = Annotated[float, Field(gt=0, le=365 * 86400)]

MIN_API_KEY_CHARS = 8
MIN_MANAGEMENT_TOKEN_CHARS = 16
# Sent as `Authorization: Bearer SECRET`: printable ASCII without spaces travels in a header unchanged.
_SECRET_PATTERN = re.compile(r"[\x21-\x7e]+")
_SECRET_FIELDS = ("api_keys", "management_token")


def split_host_port(address: str) -> tuple[str, int]:
    """("host", port) of a validated "HOST:PORT" (an IPv6 host may be in brackets)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _check_host_port(field: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'{field} must be "HOST:PORT", like "127.0.0.1:8808"')
    return value


_HOST_NAME = re.compile(r"[a-z0-9._-]+")


def _check_host_name(name: str) -> str:
    """An `allowed_hosts` entry, lower-cased: a name or an address without a port, or "*"."""
    value = name.strip().lower()
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    if value == "*" or _HOST_NAME.fullmatch(value):
        return value
    if ":" in bare:
        import ipaddress

        try:
            return str(ipaddress.IPv6Address(bare))
        except ValueError:
            pass
    raise ValueError(
        f'allowed_hosts: {name!r} is not a host name; give names or addresses without scheme or port, '
        f'like ["llm.example.lan", "192.168.1.5"], or "*" for any'
    )


def _secret_problem(secret: SecretStr, min_chars: int) -> str | None:
    """What is wrong with a key or token, without ever quoting it."""
    value = secret.get_secret_value()
    if len(value) < min_chars:
        return f"is too short ({len(value)} characters); use at least {min_chars}, e.g. from `openssl rand -hex 24`"
    if not _SECRET_PATTERN.fullmatch(value):
        return "contains spaces or non-ASCII characters; use printable ASCII only, e.g. from `openssl rand -hex 24`"
    return None


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
    # How long a client may take to send a request body before a 408, so a trickling client
    # cannot hold a connection and a buffer open indefinitely.
    body_timeout: PositiveSeconds = 30.0
    # How long a connection may take to send a request's head (its request line and headers)
    # before it is closed, so that a client that connects and stalls cannot hold it for good.
    head_timeout: PositiveSeconds = 15.0
    # Connections each listener keeps open at once; past it, a new one gets a 503 and is closed.
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    # Host names, besides localhost and loopback addresses, that a listener bound to loopback
    # answers for (`Host` header); a page of another site that rebinds its name to 127.0.0.1 is
    # refused. "*" admits any name.
    allowed_hosts: list[str] = Field(default_factory=list)
    # Bearer keys the proxy accepts; empty means no key is needed. SecretStr keeps them out of
    # every repr, log line and validation error.
    api_keys: list[SecretStr] = Field(default_factory=list)
    # Profiles may only name model files inside these directories; empty allows any path.
    model_dirs: list[Path] = Field(default_factory=list)
    # An optional TCP listener for the management API, next to the unix socket; it requires
    # `management_token` because a TCP port has no file permissions to guard it.
    management_listen: str | None = None
    management_token: SecretStr | None = None
    # How many of the last proxied requests are kept in memory for `GET /v1/requests`,
    # `llmctl requests` and the dashboard; 0 keeps none. Read at startup only.
    request_log: Annotated[int, Field(ge=0, le=100_000)] = 200
    # Whether the request log also keeps each request's and reply's body (the first 32 KiB of each).
    log_bodies: bool = False
    # Each engine's log (state_dir/logs/MODEL.log) and the daemon's own (state_dir/llmd.log) is
    # renamed to FILE.1 once it reaches this size, and `log_keep` such old files are kept.
    log_max_mib: Annotated[float, Field(gt=0, le=1_048_576)] = 50.0
    log_keep: Annotated[int, Field(ge=1, le=100)] = 3
    # Disk that saved prompt caches (profiles with `[policy] persist_kv`) may take in all, under
    # state_dir/kv; past it, the least recently used saves are deleted first.
    kv_max_gib: Annotated[float, Field(ge=0, le=1_048_576)] = 16.0

    @model_validator(mode="before")
    @classmethod
    def _hide_secrets(cls, data: Any) -> Any:
        """Wrap keys and tokens before any other check, so no error message can quote one."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in _SECRET_FIELDS:
            value = data.get(name)
            if isinstance(value, str):
                data[name] = SecretStr(value)
            elif isinstance(value, list):
                data[name] = [SecretStr(item) if isinstance(item, str) else item for item in value]
        return data

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        return _check_host_port("listen", value)

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, value: list[str]) -> list[str]:
        return [_check_host_name(name) for name in value]

    @field_validator("management_listen")
    @classmethod
    def _check_management_listen(cls, value: str | None) -> str | None:
        return None if value is None else _check_host_port("management_listen", value)

    @model_validator(mode="after")
    def _check_secrets(self) -> "ServerConfig":
        for index, key in enumerate(self.api_keys):
            problem = _secret_problem(key, MIN_API_KEY_CHARS)
            if problem:
                raise ValueError(f"api_keys: key number {index + 1} {problem}")
        if self.management_token is not None:
            problem = _secret_problem(self.management_token, MIN_MANAGEMENT_TOKEN_CHARS)
            if problem:
                raise ValueError(f"management_token {problem}")
        if self.management_listen is not None and self.management_token is None:
            raise ValueError(
                "management_listen needs management_token: anyone who can reach a TCP port could load and "
                "unload models; set management_token to a random secret of at least "
                f"{MIN_MANAGEMENT_TOKEN_CHARS} characters, or remove management_listen to use only the unix socket"
            )
        return self

    def api_key_values(self) -> list[str]:
        return [key.get_secret_value() for key in self.api_keys]

    @property
    def listen_host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return split_host_port(self.listen)[1]


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


_RPC_HOST = re.compile(r"[A-Za-z0-9._-]+")


class RpcDeviceConfig(BaseModel):
    """One device on another machine, served there by llama.cpp's RPC server (`llmd rpc-server`).

    Only engines that can use such devices (llama.cpp) are placed on it. RPC has no
    authentication: the endpoint must be on loopback or a private network.
    """

    model_config = _Strict

    # Where the RPC server listens: "HOST:PORT" (a name or an IPv4 address; llama.cpp's RPC
    # client takes no IPv6 address).
    endpoint: str
    # What `llmctl gpus` calls it; the endpoint when unset.
    name: str | None = None
    # At most this much of the device is used. A server on the CPU backend reports all of its
    # host's RAM; without a cap llmd would plan to fill it.
    total_mib: Annotated[int, Field(gt=0, le=1 << 30)] | None = None
    # Kept free on this device; `[gpus] margin_mib` when unset.
    margin_mib: Annotated[int, Field(ge=0, le=1_048_576)] | None = None

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not _RPC_HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f'{value!r} is not "HOST:PORT" with a host name or IPv4 address, like "192.168.1.20:50052"'
            )
        return value


class GpusConfig(BaseModel):
    model_config = _Strict

    # A JSON snapshot of GPUs to use instead of NVML (tests, dry runs, planning).
    simulate: Path | None = None
    # Kept free on every card beyond what NVML reports in use (allocator slack, other programs).
    margin_mib: Annotated[int, Field(ge=0, le=1_048_576)] = 512
    # How long to wait after stopping an engine for NVML to show its memory released.
    release_timeout: PositiveSeconds = 30.0
    # Devices on other machines, reached over llama.cpp's RPC (`[[gpus.rpc]]`); they join the
    # inventory after the local cards, in this order.
    rpc: list[RpcDeviceConfig] = Field(default_factory=list)
    # How often each RPC device is checked: whether it answers, and its free memory.
    rpc_check_interval: Annotated[float, Field(gt=0, le=3600)] = 2.0

    @field_validator("rpc")
    @classmethod
    def _distinct_endpoints(cls, value: list[RpcDeviceConfig]) -> list[RpcDeviceConfig]:
        seen: set[str] = set()
        for device in value:
            if device.endpoint in seen:
                raise ValueError(f"{device.endpoint} is listed twice; each RPC device needs its own endpoint")
            seen.add(device.endpoint)
        return value


class DashboardConfig(BaseModel):
    model_config = _Strict

    # The web page at /dashboard on the management listeners (docs/dashboard.md); off, it is a 404.
    enabled: bool = True
    # A browser's login ends after this many seconds without a request, and this many seconds
    # after it began at the latest (a restart ends every login).
    session_idle: SessionSeconds = 12 * 3600.0
    session_lifetime: SessionSeconds = 7 * 86400.0


class MetricsConfig(BaseModel):
    model_config = _Strict

    # GET /metrics (Prometheus) on the proxy and management listeners (docs/metrics.md); off, it
    # is a 404 and requests are not counted. Read at startup only.
    enabled: bool = True


class DaemonConfig(BaseModel):
    model_config = _Strict

    server: ServerConfig = Field(default_factory=ServerConfig)
    engines: dict[str, EngineConfig] = Field(default_factory=dict)
    gpus: GpusConfig = Field(default_factory=GpusConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    def engine(self, name: str) -> EngineConfig:
        return self.engines.get(name) or EngineConfig()

    @property
    def logs_dir(self) -> Path:
        return self.server.state_dir / "logs"

    @property
    def daemon_log(self) -> Path:
        """The daemon's own log file (outside `logs_dir`, where any name may be a model's)."""
        return self.server.state_dir / "llmd.log"


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
    server.model_dirs = [d if d.is_absolute() else base / d for d in server.model_dirs]
    if config.gpus.simulate is not None and not config.gpus.simulate.is_absolute():
        config.gpus.simulate = base / config.gpus.simulate
    return config

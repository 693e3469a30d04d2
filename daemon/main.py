"""`llmd`: the daemon.

`llmd serve` runs the OpenAI proxy on `[server] listen` and the management API on the unix
socket, in one event loop, and stops every engine before it exits: on SIGTERM or SIGINT, or when
`llmctl shutdown` asks (POST /v1/shutdown), the same way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import click
import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp

from llmd.drivers.registry import load_drivers

from llmd.daemon.web.api import build_api_app
from llmd.daemon.config import DaemonConfig, ServerConfig, config_path_from_env, load_config, split_host_port
from llmd.daemon.http.client_link import LinkedHttpProtocol
from llmd.daemon.http.connection_guard import ConnectionLimits
from llmd.daemon.http.host_check import guard_listener
from llmd.daemon.errors import LlmdError
from llmd.daemon.http.listeners import bind_tcp, bind_unix
from llmd.daemon.manager.core import Manager
from llmd.daemon.http.anthropic import anthropic_api
from llmd.daemon.http.openai_errors import error_response
from llmd.daemon.http.proxy import BearerAuth, Proxy, build_proxy_app
from llmd.daemon.http.responses_api import responses_api
from llmd.daemon.http.ollama import ollama_api
from llmd.daemon.http.request_log import RequestLog
from llmd.daemon.manager.reload import read_profiles, reload_on_sighup
from llmd.daemon.util.daemon_log import FORMAT as LOG_FORMAT
from llmd.daemon.util.daemon_log import log_to_file
from llmd.daemon.util.rotating_log import LogLimits
from llmd.daemon.util.loopback import is_loopback_host
from llmd.daemon.web.dashboard_where import DashboardPointer
from llmd.daemon.util.open_files import raise_open_files_limit
from llmd.daemon.util.sdnotify import notify, ping_watchdog_forever, started_by_systemd, watchdog_interval
from llmd.daemon.util.shutdown import Shutdown, stop_within

log = logging.getLogger("llmd")

# The management API only serves llmctl; a follower of `logs -f` must not hold up shutdown.
API_SHUTDOWN_GRACE = 2.0
# An idle kept-alive connection is closed after this long (uvicorn's default, said here).
KEEP_ALIVE_SECONDS = 5


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `llmd serve` owns the signals for both servers.

    uvicorn's housekeeping loop wakes every 0.1 s to see whether it should exit, which is most
    of what an idle daemon costs. Here it wakes once a second, to refresh the Date header (which
    has one-second resolution anyway), and setting `should_exit` wakes it at once, so shutdown
    starts as soon as it is asked for."""

    tick_seconds = 1.0
    _exit_requested = False
    _wake: anyio.Event | None = None

    @property  # type: ignore[override]
    def should_exit(self) -> bool:
        return self._exit_requested

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._exit_requested = value
        if value and self._wake is not None:
            self._wake.set()

    async def main_loop(self) -> None:
        self._wake = anyio.Event()
        # on_tick refreshes the Date header when its counter is a multiple of 10 (its 0.1 s
        # ticks): every tick here is a whole second, so it always passes 0.
        while not await self.on_tick(0):
            with anyio.move_on_after(self.tick_seconds):
                await self._wake.wait()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _server(
    app: ASGIApp, graceful_seconds: float, *, forwarded_headers: bool = True, limits: ConnectionLimits | None = None
) -> _Server:
    """uvicorn serving `app`; `forwarded_headers` trusts X-Forwarded-For and -Proto from loopback,
    which the dashboard needs behind a TLS proxy (its cookie is marked Secure from the scheme).
    `limits` bound what each connection may take (see connection_guard)."""
    config = uvicorn.Config(
        app,
        # Short cuts for relayed streams (see client_link), within the connection limits.
        http=functools.partial(LinkedHttpProtocol, limits=limits or ConnectionLimits()),  # type: ignore[arg-type]
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        proxy_headers=forwarded_headers,
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=graceful_seconds,
    )
    return _Server(config)


def _management_over_tcp(
    manager: Manager, server: ServerConfig, requests: RequestLog, playground: ASGIApp, shutdown: Shutdown,
    config_path: Path | None = None,
) -> tuple[_Server, socket.socket] | None:
    """The management API on `[server] management_listen`, behind `management_token`; None if not configured."""
    if server.management_listen is None:
        return None
    assert server.management_token is not None  # config validation refuses a TCP listener without one
    sock = bind_tcp(*split_host_port(server.management_listen), setting="[server] management_listen")
    token = server.management_token.get_secret_value()
    bearer = BearerAuth(
        build_api_app(manager, requests, playground, shutdown, config_path),
        [token],
        credential="the [server] management_token",
        reject=lambda message: JSONResponse({"error": message}, status_code=401),
    )
    from llmd.daemon.web.dashboard_auth import DashboardAuth
    from llmd.daemon.web.dashboard_sessions import SessionStore

    # A browser cannot send the Bearer header: the dashboard's login trades the token for a cookie.
    dashboard = manager.config.dashboard
    sessions = SessionStore(dashboard.session_idle, dashboard.session_lifetime)
    app: ASGIApp = DashboardAuth(bearer, sessions) if dashboard.enabled else bearer
    host = split_host_port(server.management_listen)[0]
    app = guard_listener(app, host, server.allowed_hosts, _management_error(403))
    return _server(app, API_SHUTDOWN_GRACE, limits=_connection_limits(server)), sock


def _management_error(status: int) -> Callable[[str], JSONResponse]:
    """The management API's error reply: `{"error": MESSAGE}`."""
    return lambda message: JSONResponse({"error": message}, status_code=status)


def _connection_limits(server: ServerConfig) -> ConnectionLimits:
    """What each connection to one listener may take."""
    return ConnectionLimits(head_timeout=server.head_timeout, max_connections=server.max_connections)


def _raise_open_files(server: ServerConfig) -> None:
    """Take every descriptor the hard limit allows, and say how many that is."""
    before, after = raise_open_files_limit()
    raised = f" (raised from {before})" if after != before else ""
    log.info("open files limit: %d%s", after, raised)
    if server.max_connections * 2 > after:  # a proxied connection holds one to its engine too
        log.warning(
            "[server] max_connections = %d may use up the %d descriptors llmd may open (each proxied "
            "connection holds one to its engine too); lower it, or raise LimitNOFILE / ulimit -n",
            server.max_connections, after,
        )


def _warn_if_open(server: ServerConfig) -> None:
    """An address other hosts can reach, without API keys: anyone there may use every model."""
    if server.api_keys or is_loopback_host(server.listen_host):
        return
    log.warning(
        "listening on %s without api_keys: anyone who can reach this address can use every model; "
        "set [server] api_keys in llmd.toml, or listen on 127.0.0.1", server.listen,
    )


def _warn_if_root() -> None:
    from llmd.daemon.service.root_warning import root_warning

    warning = root_warning("llmd serve", "the engines it starts parse model files and run their packages' code")
    if warning is not None:
        log.warning("%s", warning)


async def serve(config: DaemonConfig, config_path: Path | None = None) -> None:
    """Run until SIGTERM/SIGINT or POST /v1/shutdown; SIGHUP re-reads `config_path` and the profiles."""
    server = config.server
    # Read before anything else runs: the environment systemd started the daemon with.
    systemd_variable = started_by_systemd()
    _warn_if_open(server)
    _warn_if_root()
    _raise_open_files(server)
    drivers = load_drivers()
    profiles = read_profiles(config, drivers)
    server.state_dir.mkdir(parents=True, exist_ok=True)
    config.logs_dir.mkdir(parents=True, exist_ok=True)

    proxy_socket = bind_tcp(server.listen_host, server.listen_port)
    api_socket = bind_unix(server.socket)
    manager = Manager(config, drivers, profiles)
    manager.reap_leftovers()
    proxy = Proxy(manager, server.body_timeout)
    # /metrics sits behind the api keys; the request counter sits outside them, so 401s count too.
    proxy_app = build_proxy_app(
        proxy,
        server.api_key_values(),
        extra_routes=manager.metrics.routes(),
        apis=[anthropic_api(proxy), responses_api(proxy), ollama_api(proxy)],
    )
    # A browser that opens /dashboard here learns where the dashboard is (without an API key).
    proxy_app = DashboardPointer(proxy_app, lambda: manager.config)
    # Nothing on the proxy port reads the client's address or scheme: without the forwarded
    # headers' middleware, every request skips a layer.
    requests = RequestLog(server.request_log, server.log_bodies)
    # A page of another site that rebinds its name to 127.0.0.1 is refused (see host_check).
    proxy_app = guard_listener(proxy_app, server.listen_host, server.allowed_hosts,
                               lambda message: error_response(403, message))
    proxy_server = _server(manager.metrics.instrument(proxy_app, requests), server.shutdown_grace,
                           forwarded_headers=False, limits=_connection_limits(server))
    # The dashboard's playground enters the same proxy, counted and logged alike; the management
    # listener's own access control stands in for an API key (docs/dashboard.md).
    playground = manager.metrics.instrument(proxy, requests)
    listeners: list[tuple[_Server, socket.socket]] = []

    def stop_gracefully(who: str) -> None:
        """Stop taking requests and let the listeners drain; then `serve` stops every engine."""
        log.info("%s: finishing in-flight requests, then stopping engines", who)
        notify("STOPPING=1", "STATUS=finishing in-flight requests, then stopping engines")
        for each, _ in listeners:
            each.should_exit = True

    shutdown = Shutdown(stop_gracefully, systemd_variable,
                        stop_within(server.shutdown_grace, API_SHUTDOWN_GRACE, server.stop_grace))
    api_app = guard_listener(build_api_app(manager, requests, playground, shutdown, config_path), None,
                             server.allowed_hosts, _management_error(403))
    api_server = _server(api_app, API_SHUTDOWN_GRACE, limits=_connection_limits(server))
    listeners += [(proxy_server, proxy_socket), (api_server, api_socket)]
    management_tcp = _management_over_tcp(manager, server, requests, playground, shutdown, config_path)
    if management_tcp is not None:
        listeners.append(management_tcp)

    async def stop_on_signal() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if proxy_server.should_exit:
                    log.warning("second %s: not waiting for requests any longer", signal.Signals(signum).name)
                    for each, _ in listeners:
                        each.force_exit = True
                    return
                stop_gracefully(signal.Signals(signum).name)

    try:
        async with anyio.create_task_group() as daemon:
            await daemon.start(manager.run)
            manager.autostart()
            daemon.start_soon(stop_on_signal)
            daemon.start_soon(reload_on_sighup, manager, config_path)
            interval = watchdog_interval()
            if interval is not None:
                daemon.start_soon(ping_watchdog_forever, interval)
            async with anyio.create_task_group() as servers:
                for each, sock in listeners:
                    servers.start_soon(each.serve, [sock])
                while not all(each.started for each, _ in listeners):
                    await anyio.sleep(0.01)
                status = (
                    f"serving {len(profiles.profiles)} profiles ({len(profiles.errors)} invalid) "
                    f"on http://{server.listen}, management on {server.socket}"
                )
                if server.management_listen is not None:
                    status += f" and http://{server.management_listen} (token required)"
                log.info("llmd ready: %s", status)
                notify("READY=1", f"STATUS={status}")
            # Both servers have drained: stop the signal watcher and, through manager.run, every engine.
            daemon.cancel_scope.cancel()
    finally:
        manager.kill_all_now()
        with contextlib.suppress(FileNotFoundError):
            server.socket.unlink()
    log.info("llmd stopped")


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from llmd.daemon.version import configured_engines_dir, version_text

    click.echo(version_text(configured_engines_dir(None)))
    ctx.exit()


@click.group()
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="print llmd's version and the installed engines' versions, and exit")
def main() -> None:
    """llmd: run local LLM engines behind one OpenAI-compatible address."""


@main.command("serve")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="llmd.toml to use (default: $LLMD_CONFIG, then ~/.config/llmd/llmd.toml)")
def serve_command(config_path: Path | None) -> None:
    """Run the daemon in the foreground until SIGTERM or Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    # httpx logs a line per request: downloads and sleep/wake calls would flood the journal.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        path = config_path_from_env(config_path)
        config = load_config(path)
        log_to_file(config.daemon_log, LogLimits.from_mib(config.server.log_max_mib, config.server.log_keep))
        anyio.run(serve, config, path, backend_options={"use_uvloop": True})
    except LlmdError as exc:
        click.echo(f"llmd: {exc}", err=True)
        sys.exit(2)


@main.command("init")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="llmd.toml to use (default: $LLMD_CONFIG, then ~/.config/llmd/llmd.toml)")
@click.option("--demo", is_flag=True, help="also write a tiny demo model and its profile")
def init_command(config_path: Path | None, demo: bool) -> None:
    """Set llmd up for this user: a commented llmd.toml, a `systemctl --user` unit, and the
    directories (with --demo, also a model to try it on). Existing files are kept."""
    from llmd.daemon.models.demo import write_demo
    from llmd.daemon.service.user_init import config_target, write_user_config, write_user_unit

    target = config_target(config_path)
    try:
        write_user_config(target, click.echo)
        config = load_config(target)
        write_user_unit(target, click.echo)
    except OSError as exc:
        click.echo(f"llmd: {exc}", err=True)
        sys.exit(1)
    except LlmdError as exc:
        click.echo(f"llmd: {exc}", err=True)
        sys.exit(2)
    for directory in (config.server.state_dir, *config.server.profile_dirs):
        directory.mkdir(parents=True, exist_ok=True)
    click.echo(f"state: {config.server.state_dir}\nprofiles: {', '.join(map(str, config.server.profile_dirs))}")
    if demo:
        model, profile = write_demo(config)
        click.echo(f"demo model: {model}\ndemo profile: {profile}")


def _engine_list(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in (value or "").split(",") if name.strip())


@main.command("install")
@click.option("--engines", callback=_engine_list, metavar="ENGINE[,ENGINE...]",
              help="also build these engines as the llmd user: llama-cpp, fastllm, vllm")
@click.option("--cuda", is_flag=True, help="build the engines' CUDA flavour (with --engines)")
@click.option("--no-start", is_flag=True, help="enable the service without starting it")
@click.option("--root", "root", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="set up the tree at DIR (an image) instead of the running system")
def install_command(engines: tuple[str, ...], cuda: bool, no_start: bool, root: Path | None) -> None:
    """Set llmd up as a systemd service (as root): user, directories, config, unit, start.

    Running it again changes nothing; an existing /etc/llmd/llmd.toml is never overwritten.
    """
    # Loaded here so that `llmd serve` does not import the installer.
    from llmd.daemon.service.install import install
    from llmd.daemon.service.layout import Target

    try:
        install(Target(root.absolute() if root else None), engines, cuda=cuda, start=not no_start, echo=click.echo)
    except LlmdError as exc:
        click.echo(f"llmd install: {exc}", err=True)
        sys.exit(1)


@main.command("uninstall")
@click.option("--purge", is_flag=True, help="also remove /etc/llmd and /var/lib/llmd (config, profiles, models, engines)")
@click.option("--remove-user", is_flag=True, help="with --purge, also remove the llmd user and group")
@click.option("--root", "root", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="undo an install into the tree at DIR instead of the running system")
def uninstall_command(purge: bool, remove_user: bool, root: Path | None) -> None:
    """Stop and remove the llmd service; keeps config, models and state unless --purge."""
    from llmd.daemon.service.layout import Target
    from llmd.daemon.service.uninstall import uninstall

    try:
        uninstall(Target(root.absolute() if root else None), purge=purge, remove_user=remove_user, echo=click.echo)
    except LlmdError as exc:
        click.echo(f"llmd uninstall: {exc}", err=True)
        sys.exit(1)


@main.command("rpc-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="the address to listen on")
@click.option("--port", default=50052, show_default=True, type=click.IntRange(1, 65535), help="the port to listen on")
@click.option("--device", metavar="NAME", help="the device to serve, as llama.cpp names it (CUDA0, CUDA1, CPU); "
              "default: the first GPU, else the CPU")
@click.option("--threads", type=click.IntRange(1), help="CPU threads, for the CPU device")
@click.option("--cache", is_flag=True, help="keep the tensors it receives in a local file cache, so a model loads "
              "faster the next time")
@click.option("--allow-remote", is_flag=True, help="listen on an address other than loopback. RPC has no "
              "authentication: a private network only")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="llmd.toml, for its engines_dir")
def rpc_server_command(host: str, port: int, device: str | None, threads: int | None, cache: bool,
                       allow_remote: bool, config_path: Path | None) -> None:
    """Serve one device of this machine to another machine's llmd, over llama.cpp's RPC.

    The other machine lists HOST:PORT under [[gpus.rpc]] in its llmd.toml. Runs until stopped."""
    import os

    from llmd.daemon.engines.rpc_server import check_host, find_rpc_server, first_device, rpc_server_argv

    try:
        check_host(host, allow_remote)
        config = load_config(config_path_from_env(config_path))
        binary = find_rpc_server(config.server.engines_dir)
        device = device or first_device(binary.parent / "llama-server")
    except LlmdError as exc:
        click.echo(f"llmd rpc-server: {exc}", err=True)
        sys.exit(2)
    argv = rpc_server_argv(binary, host, port, device, threads, cache)
    click.echo(f"llmd rpc-server: serving {device} on {host}:{port}", err=True)
    os.execv(argv[0], argv)  # the server itself, so that signals and systemd reach it directly

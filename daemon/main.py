"""`llmd`: the daemon.

`llmd serve` runs the OpenAI proxy on `[server] listen` and the management API on the unix
socket, in one event loop, and stops every engine before it exits.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import click
import uvicorn
from starlette.types import ASGIApp

from llmd.drivers.registry import load_drivers

from .api import build_api_app
from .config import DaemonConfig, config_path_from_env, load_config
from .errors import LlmdError
from .listeners import bind_tcp, bind_unix
from .manager import Manager
from .profiles import load_profiles
from .proxy import Proxy, build_proxy_app
from .sdnotify import notify, ping_watchdog_forever, watchdog_interval

log = logging.getLogger("llmd")

# The management API only serves llmctl; a follower of `logs -f` must not hold up shutdown.
API_SHUTDOWN_GRACE = 2.0


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `llmd serve` owns the signals for both servers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _server(app: ASGIApp, graceful_seconds: float) -> _Server:
    config = uvicorn.Config(
        app,
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=graceful_seconds,
    )
    return _Server(config)


async def serve(config: DaemonConfig) -> None:
    server = config.server
    drivers = load_drivers()
    profiles = load_profiles(server.profile_dirs, set(drivers))
    for error in profiles.errors.values():
        log.error("skipping invalid profile: %s", error)
    server.state_dir.mkdir(parents=True, exist_ok=True)
    config.logs_dir.mkdir(parents=True, exist_ok=True)

    proxy_socket = bind_tcp(server.listen_host, server.listen_port)
    api_socket = bind_unix(server.socket)
    manager = Manager(config, drivers, profiles)
    proxy = Proxy(manager)
    proxy_server = _server(build_proxy_app(proxy), server.shutdown_grace)
    api_server = _server(build_api_app(manager), API_SHUTDOWN_GRACE)

    async def stop_on_signal() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if proxy_server.should_exit:
                    log.warning("second %s: not waiting for requests any longer", signal.Signals(signum).name)
                    proxy_server.force_exit = api_server.force_exit = True
                    return
                log.info("%s: finishing in-flight requests, then stopping engines", signal.Signals(signum).name)
                notify("STOPPING=1", "STATUS=finishing in-flight requests, then stopping engines")
                proxy_server.should_exit = api_server.should_exit = True

    try:
        async with anyio.create_task_group() as daemon:
            await daemon.start(manager.run)
            daemon.start_soon(stop_on_signal)
            interval = watchdog_interval()
            if interval is not None:
                daemon.start_soon(ping_watchdog_forever, interval)
            async with anyio.create_task_group() as servers:
                servers.start_soon(proxy_server.serve, [proxy_socket])
                servers.start_soon(api_server.serve, [api_socket])
                while not (proxy_server.started and api_server.started):
                    await anyio.sleep(0.01)
                status = (
                    f"serving {len(profiles.profiles)} profiles ({len(profiles.errors)} invalid) "
                    f"on http://{server.listen}, management on {server.socket}"
                )
                log.info("llmd ready: %s", status)
                notify("READY=1", f"STATUS={status}")
            # Both servers have drained: stop the signal watcher and, through manager.run, every engine.
            daemon.cancel_scope.cancel()
    finally:
        manager.kill_all_now()
        await proxy.aclose()
        with contextlib.suppress(FileNotFoundError):
            server.socket.unlink()
    log.info("llmd stopped")


@click.group()
def main() -> None:
    """llmd: run local LLM engines behind one OpenAI-compatible address."""


@main.command("serve")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="llmd.toml to use (default: $LLMD_CONFIG, then ~/.config/llmd/llmd.toml)")
def serve_command(config_path: Path | None) -> None:
    """Run the daemon in the foreground until SIGTERM or Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per proxied or probed request would flood the journal and slow the hot path.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        config = load_config(config_path_from_env(config_path))
        anyio.run(serve, config, backend_options={"use_uvloop": True})
    except LlmdError as exc:
        click.echo(f"llmd: {exc}", err=True)
        sys.exit(2)


@main.command("init")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="llmd.toml to use (default: $LLMD_CONFIG, then ~/.config/llmd/llmd.toml)")
@click.option("--demo", is_flag=True, help="also write a tiny demo model and its profile")
def init_command(config_path: Path | None, demo: bool) -> None:
    """Create llmd's directories (and, with --demo, a model to try it on)."""
    from .init_demo import write_demo

    try:
        config = load_config(config_path_from_env(config_path))
    except LlmdError as exc:
        click.echo(f"llmd: {exc}", err=True)
        sys.exit(2)
    for directory in (config.server.state_dir, *config.server.profile_dirs):
        directory.mkdir(parents=True, exist_ok=True)
    click.echo(f"state: {config.server.state_dir}\nprofiles: {', '.join(map(str, config.server.profile_dirs))}")
    if demo:
        model, profile = write_demo(config)
        click.echo(f"demo model: {model}\ndemo profile: {profile}")

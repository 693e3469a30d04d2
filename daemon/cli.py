"""`llmctl`: talk to a running llmd over its unix socket.

Exit codes scripts can rely on:
  0  done
  1  the daemon refused or failed the action (the message says why)
  2  bad usage (unknown command, bad option)
  3  the daemon is not reachable on its socket
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx

from .config import config_path_from_env, default_socket, load_config
from .durations import format_duration
from .errors import LlmdError
from .profiles import check_model_name
from .units import format_mib

EXIT_FAILED = 1
EXIT_UNREACHABLE = 3


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"llmctl: {message}", err=True)
    sys.exit(code)


class Daemon:
    """A small client for the management API."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)),
            base_url="http://llmd",
            timeout=httpx.Timeout(30.0, read=None),
        )

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError):
            _fail(
                f"cannot reach llmd on {self.socket_path}: is `llmd serve` running? "
                "(set --socket or LLMD_SOCKET if it listens elsewhere)",
                EXIT_UNREACHABLE,
            )
        except PermissionError:
            _fail(f"permission denied on {self.socket_path}: join the socket's group (e.g. `llmd`)", EXIT_UNREACHABLE)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        with self._errors():
            response = self.client.request(method, path, **kwargs)
        if response.status_code >= 400:
            _fail(_error_text(response))
        return response.json()

    def stream_lines(self, method: str, path: str, **kwargs: Any) -> Iterator[str]:
        with self._errors():
            with self.client.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    _fail(_error_text(response))
                yield from response.iter_lines()

    def stream_bytes(self, path: str, **kwargs: Any) -> Iterator[bytes]:
        with self._errors():
            with self.client.stream("GET", path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    _fail(_error_text(response))
                yield from response.iter_raw()


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        error = body.get("error")
        return error if isinstance(error, str) else json.dumps(error)
    except ValueError:
        return f"HTTP {response.status_code}: {response.text.strip()}"


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _dash(value: Any) -> str:
    return "-" if value is None or value == [] else str(value)


@click.group()
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="LLMD_SOCKET",
              help="llmd's management socket (default: from llmd.toml, else $XDG_RUNTIME_DIR/llmd/llmd.sock)")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="llmd.toml to read paths from (default: $LLMD_CONFIG)")
@click.pass_context
def main(ctx: click.Context, socket_path: Path | None, config_path: Path | None) -> None:
    """Control a running llmd: load, unload and inspect models."""
    ctx.obj = {"socket": socket_path, "config": config_path}


def _check_name(name: str) -> str:
    """Refuse a name that is not a model id before it goes into a URL path."""
    try:
        return check_model_name(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None


def _daemon(ctx: click.Context) -> Daemon:
    socket_path = ctx.obj["socket"]
    if socket_path is None:
        path = config_path_from_env(ctx.obj["config"])
        try:
            socket_path = load_config(path).server.socket if path else default_socket()
        except LlmdError as exc:
            _fail(str(exc))
    return Daemon(socket_path)


@main.command()
@click.argument("name")
@click.option("--replace", "old", metavar="OLD", help="swap OLD out for NAME (OLD stops once NAME is ready, or first if both do not fit)")
@click.pass_context
def load(ctx: click.Context, name: str, old: str | None) -> None:
    """Start NAME's engine and wait until it is ready, showing progress."""
    _check_name(name)
    if old:
        _check_name(old)
    daemon = _daemon(ctx)
    interactive = sys.stderr.isatty()
    params = {"replace": old} if old else {}
    for line in daemon.stream_lines("POST", f"/v1/models/{name}/load", params=params):
        if not line.strip():
            continue
        event = json.loads(line)
        if event["event"] == "progress":
            text = f"{name}: {event['message'] or 'loading'} ({event['elapsed_s']:.1f}s)"
            if event.get("log"):
                text += f"  | {event['log'][:100]}"
            click.echo(("\r\x1b[2K" + text) if interactive else text, err=True, nl=not interactive)
        elif event["event"] == "error":
            if interactive:
                click.echo(err=True)
            _fail(event["message"])
        elif event["event"] == "ready":
            if interactive:
                click.echo("\r\x1b[2K", err=True, nl=False)
            status = event["status"]
            took = f" in {status['load_s']:.2f}s" if status.get("load_s") is not None else ""
            click.echo(f"{name} is ready{took} (pid {status['pid']}, port {status['port']})")


@main.command()
@click.argument("name")
@click.pass_context
def pull(ctx: click.Context, name: str) -> None:
    """Download NAME's model files (Hugging Face) without loading it."""
    _check_name(name)
    interactive = sys.stderr.isatty()
    for line in _daemon(ctx).stream_lines("POST", f"/v1/models/{name}/pull"):
        if not line.strip():
            continue
        event = json.loads(line)
        if event["event"] == "progress" and event["message"]:
            click.echo(("\r\x1b[2K" + event["message"]) if interactive else event["message"], err=True, nl=not interactive)
        elif event["event"] == "error":
            if interactive:
                click.echo(err=True)
            _fail(event["message"])
        elif event["event"] == "done":
            if interactive:
                click.echo("\r\x1b[2K", err=True, nl=False)
            click.echo(f"{name}: model files are complete")


@main.command()
@click.argument("name", required=False)
@click.option("--all", "unload_all", is_flag=True, help="unload every model")
@click.pass_context
def unload(ctx: click.Context, name: str | None, unload_all: bool) -> None:
    """Stop NAME's engine (or every engine with --all)."""
    if bool(name) == unload_all:
        raise click.UsageError("give a model NAME or --all")
    if name:
        _check_name(name)
    daemon = _daemon(ctx)
    if unload_all:
        result = daemon.call("POST", "/v1/unload")
        click.echo(f"unloaded: {', '.join(result['unloaded']) or 'nothing was running'}")
        return
    result = daemon.call("POST", f"/v1/models/{name}/unload")
    click.echo(f"{result['model']}: {'unloaded' if result['unloaded'] else 'was not running'}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON (with each engine's argv)")
@click.pass_context
def ps(ctx: click.Context, as_json: bool) -> None:
    """Models that have run since the daemon started, and their state."""
    models = _daemon(ctx).call("GET", "/v1/ps")["models"]
    if as_json:
        click.echo(json.dumps(models, indent=2))
        return
    rows = [
        [m["model"], m["engine"], m["state"], _dash(m["pid"]), _dash(m["port"]), _where(m),
         format_mib(m["vram_mib"]) if m["vram_mib"] else "-", format_duration(m["uptime_s"]),
         format_duration(m["idle_s"]), str(m["in_flight"])]
        for m in models
    ]
    click.echo(_table(rows, ["model", "engine", "state", "pid", "port", "gpus", "vram", "uptime", "idle", "busy"]))
    for m in models:
        if m["state"] == "failed" and m["error"]:
            click.echo(f"\n{m['model']} failed: {m['error']}", err=True)


def _where(row: dict[str, Any]) -> str:
    """"cpu", "0,1", or "0 (20 layers; 12 MoE on cpu)" for an offloaded model."""
    if row["pid"] is None:
        return "-"
    if not row["gpus"]:
        return "cpu"
    where = ",".join(map(str, row["gpus"]))
    split = []
    if row.get("gpu_layers") is not None:
        split.append(f"{row['gpu_layers']} layers")
    if row.get("cpu_moe_layers"):
        split.append(f"{row['cpu_moe_layers']} MoE on cpu")
    return f"{where} ({'; '.join(split)})" if split else where


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def plan(ctx: click.Context, name: str, as_json: bool) -> None:
    """What loading NAME now would need and do (nothing is loaded)."""
    _check_name(name)
    report = _daemon(ctx).call("GET", f"/v1/models/{name}/plan")
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{report['model']} ({report['state']}); GPUs: {report['inventory']}")
    estimate = report.get("estimate")
    if estimate:
        click.echo(
            f"  estimate: weights {format_mib(estimate['weights_mib'])}, KV {format_mib(estimate['kv_mib'])} "
            f"({estimate['kv_cells']} cells), compute {format_mib(estimate['compute_mib'])}, "
            f"overhead {format_mib(estimate['gpu_overhead_mib'])}/GPU; {estimate['n_layers']} layers"
        )
    if "need_mib" in report:
        click.echo(f"  reserve: {format_mib(report['need_mib'])} ({report['need_source']})")
    if not report["fits"]:
        click.echo(f"  does not fit now: {report['reason']}")
        sys.exit(EXIT_FAILED)
    gpus = ", ".join(f"GPU {g['index']}: {format_mib(g['vram_mib'])}" for g in report["gpus"]) or "CPU only"
    click.echo(f"  placement: {gpus}")
    if report["gpu_layers"] is not None and report["gpus"]:
        click.echo(f"  layers on GPU: {report['gpu_layers']}; MoE layers on CPU: {report['cpu_moe_layers']}")
    if report["evict"]:
        click.echo(f"  would evict: {', '.join(report['evict'])}")
    click.echo(f"  why: {report['reason']}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def gpus(ctx: click.Context, as_json: bool) -> None:
    """The GPUs, their memory, and which model holds what."""
    report = _daemon(ctx).call("GET", "/v1/gpus")
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(report["note"])
    rows = [
        [str(g["index"]), g["name"], format_mib(g["used_mib"]), format_mib(g["free_mib"]), format_mib(g["total_mib"]),
         ", ".join(f"{m['model']} {format_mib(m['vram_mib'])}" for m in g["models"]) or "-",
         format_mib(g["foreign_mib"]) if g["foreign_mib"] else "-"]
        for g in report["gpus"]
    ]
    if rows:
        click.echo(_table(rows, ["gpu", "name", "used", "free", "total", "llmd models", "others"]))


@main.command("ls")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def list_profiles(ctx: click.Context, as_json: bool) -> None:
    """Profiles the daemon found, valid or not."""
    profiles = _daemon(ctx).call("GET", "/v1/profiles")["profiles"]
    if as_json:
        click.echo(json.dumps(profiles, indent=2))
        return
    rows = [
        [p["name"], _dash(p["engine"]), "ok" if p["valid"] else "INVALID", _dash(p["state"]),
         ",".join(p["aliases"]) or "-", _dash(p["model"])]
        for p in profiles
    ]
    click.echo(_table(rows, ["name", "engine", "profile", "state", "aliases", "model"]))
    for p in profiles:
        if not p["valid"]:
            click.echo(f"\n{p['error']}", err=True)


@main.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines")
@click.option("-n", "--lines", default=50, show_default=True, help="how many lines of the end to show")
@click.pass_context
def logs(ctx: click.Context, name: str, follow: bool, lines: int) -> None:
    """Print NAME's engine log."""
    _check_name(name)
    params = {"lines": lines, "follow": "1" if follow else "0"}
    try:
        for chunk in _daemon(ctx).stream_bytes(f"/v1/models/{name}/logs", params=params):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    except KeyboardInterrupt:
        pass


from .cli_engines import engines  # noqa: E402  (registers the `engines` group)

main.add_command(engines)

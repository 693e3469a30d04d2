"""`llmctl`: talk to a running llmd over its unix socket (and write profiles, list engines, complete names).

Exit codes scripts can rely on (docs/cli.md has them per command):
  0  done
  1  the daemon refused or failed the action, or a local step failed (the message says why)
  2  bad usage (unknown command, bad option or argument value)
  3  the daemon is not reachable on its socket
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from llmd.daemon.cli.client import EXIT_FAILED, daemon_for, fail
from llmd.daemon.cli.complete import complete_model_names, completion
from llmd.daemon.cli.global_options import accept_global_options
from llmd.daemon.cli.lazy import LazyCommand, LazyGroup
from llmd.daemon.cli.output import dash as _dash
from llmd.daemon.cli.output import Progress, echo_json, echo_plan
from llmd.daemon.cli.output import table as _table
from llmd.daemon.cli.shutdown import shutdown
from llmd.daemon.cli.status import status
from llmd.daemon.util.durations import format_duration
from llmd.daemon.util.log_lines import DEFAULT_LOG_LINES, LOG_ABSENT_HEADER, MAX_LOG_LINES
from llmd.daemon.util.units import format_mib

if TYPE_CHECKING:
    from llmd.daemon.cli.unix_http import Response

# The commands that work without the daemon, each imported only when it runs: they need the
# config's validation, the drivers, and for `doctor` and `bench` much more. The summaries are
# the first lines of their help (tests/test_cli_imports.py checks that they stay so).
LOCAL_COMMANDS = {
    "bench": LazyCommand("llmd.daemon.cli.bench", "bench",
                         "Prompt and generation tokens/s of NAME through the proxy, at 1..N concurrent streams."),
    "doctor": LazyCommand("llmd.daemon.cli.doctor", "doctor",
                          "Check engines, GPUs, permissions and ports, and smoke-test each engine; "
                          "say how to fix what fails."),
    "engines": LazyCommand("llmd.daemon.cli.engines", "engines",
                           "List installed engines and what this host can run "
                           "(or install one with `engines install`)."),
    "profile": LazyCommand("llmd.daemon.cli.profile", "profile",
                           "Write and list profile files (reads the files directly; the daemon may be stopped)."),
}


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from llmd.daemon.version import configured_engines_dir, version_text

    click.echo(version_text(configured_engines_dir(None)))
    ctx.exit()


@click.group(cls=LazyGroup, lazy=LOCAL_COMMANDS, prepare=accept_global_options)
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="LLMD_SOCKET",
              help="llmd's management socket (default: from llmd.toml, else the first of the usual places "
                   "that answers: docs/cli.md)")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="llmd.toml to read paths from (default: $LLMD_CONFIG)")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="print llmd's version and the installed engines' versions, and exit")
@click.pass_context
def main(ctx: click.Context, socket_path: Path | None, config_path: Path | None) -> None:
    """Control a running llmd: load, unload and inspect models.

    --socket and --config may also follow the command's name. Exit codes: 0 done, 1 failed or
    refused, 2 bad usage, 3 llmd not reachable.
    """


def _check_name(name: str) -> str:
    """Refuse a name that is not a model id before it goes into a URL path."""
    from llmd.daemon.models.names import check_model_name

    try:
        return check_model_name(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None


@main.command()
@click.argument("name", shell_complete=complete_model_names)
@click.option("--replace", "old", metavar="OLD", shell_complete=complete_model_names,
              help="swap OLD out for NAME (OLD stops once NAME is ready, or first if both do not fit)")
@click.pass_context
def load(ctx: click.Context, name: str, old: str | None) -> None:
    """Start NAME's engine and wait until it is ready, showing progress."""
    _check_name(name)
    if old:
        _check_name(old)
    params = {"replace": old} if old else {}

    def progress_text(event: dict[str, Any]) -> str:
        text = f"{name}: {event['message'] or 'loading'} ({event['elapsed_s']:.1f}s)"
        if event.get("log"):
            text += f"  | {event['log'][:100]}"
        return text

    lines = daemon_for(ctx).stream_lines("POST", f"/v1/models/{name}/load", params=params)
    ready = _follow_job(lines, "ready", progress_text)
    if ready is not None:
        click.echo(load_summary(name, ready["status"], ready.get("outcome") or {}))


def load_summary(name: str, status: dict[str, Any], outcome: dict[str, Any]) -> str:
    """What `load` did, in one line: nothing (already running), or ready after making room."""
    where = f"pid {status['pid']}, port {status['port']}"
    if outcome.get("already_running"):
        return f"{name} was already running ({where})"
    took = f" in {status['load_s']:.2f}s" if status.get("load_s") is not None else ""
    text = f"{name} is ready{took} ({where})"
    done = []
    if outcome.get("replaced"):
        done.append(f"replaced {outcome['replaced']}")
    if outcome.get("evicted"):
        done.append(f"stopped idle {', '.join(outcome['evicted'])} to make room")
    if outcome.get("parked"):
        done.append(f"put idle {', '.join(outcome['parked'])} to sleep to make room")
    return text + ("; " + "; ".join(done) if done else "")


@main.command()
@click.argument("name", shell_complete=complete_model_names)
@click.pass_context
def pull(ctx: click.Context, name: str) -> None:
    """Download NAME's model files (Hugging Face) without loading it."""
    if "/" in name:
        # A repo id where a profile's name belongs: a Hub model is pulled through its profile.
        raise click.BadParameter(
            f"{name!r} looks like a Hugging Face repo, but `llmctl pull` takes a profile's name. Write a profile "
            f"for the repo first: `llmctl profile new NAME --from-hf {name}`, then `llmctl pull NAME`",
            param_hint="NAME",
        )
    _check_name(name)
    lines = daemon_for(ctx).stream_lines("POST", f"/v1/models/{name}/pull")
    if _follow_job(lines, "done", lambda event: event["message"]) is not None:
        click.echo(f"{name}: model files are complete")


def _follow_job(lines: Iterable[str], final: str, progress_text: Callable[[dict[str, Any]], str]) -> dict[str, Any] | None:
    """Follow a job's NDJSON events (`POST .../load`, `.../pull`), showing each progress event's
    `progress_text` (an empty one shows nothing), until the `final` event, which is returned.
    An error event ends llmctl with exit code 1 and the daemon's message."""
    progress = Progress()
    for line in lines:
        if not line.strip():
            continue
        event = json.loads(line)
        if event["event"] == "progress":
            text = progress_text(event)
            if text:
                progress(text)
        elif event["event"] == "error":
            progress.keep()
            fail(event["message"])
        elif event["event"] == final:
            progress.clear()
            return event
    return None


@main.command()
@click.argument("name", required=False, shell_complete=complete_model_names)
@click.option("--all", "unload_all", is_flag=True, help="unload every model")
@click.pass_context
def unload(ctx: click.Context, name: str | None, unload_all: bool) -> None:
    """Stop NAME's engine (or every engine with --all)."""
    if bool(name) == unload_all:
        raise click.UsageError("give a model NAME or --all")
    if name:
        _check_name(name)
    daemon = daemon_for(ctx)
    if unload_all:
        result = daemon.call("POST", "/v1/unload")
        click.echo(f"unloaded: {', '.join(result['unloaded']) or 'nothing was running'}")
        return
    result = daemon.call("POST", f"/v1/models/{name}/unload")
    click.echo(f"{result['model']}: {'unloaded' if result['unloaded'] else 'was not running'}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON (raw MiB and seconds, with each engine's argv)")
@click.pass_context
def ps(ctx: click.Context, as_json: bool) -> None:
    """Models that have run since the daemon started, and their state."""
    models = daemon_for(ctx).call("GET", "/v1/ps")["models"]
    if as_json:
        echo_json(models)
        return
    rows = [
        [m["model"], m["engine"], _state(m), _dash(m["pid"]), _dash(m["port"]), _where(m),
         format_mib(m["vram_mib"]) if m["vram_mib"] else "-", format_duration(m["uptime_s"]),
         format_duration(m["idle_s"]), str(m["in_flight"]), _kv_saved(m)]
        for m in models
    ]
    click.echo(_table(rows, ["model", "engine", "state", "pid", "port", "gpus", "vram", "uptime", "idle", "busy", "kv saved"]))
    for m in models:
        if m["state"] == "failed" and m["error"]:
            click.echo(f"\n{m['model']} failed: {m['error']}", err=True)
        if m.get("profile_error"):
            click.echo(f"\n{m['model']}: its profile is invalid, so it runs on its last good version: "
                       f"{m['profile_error']}", err=True)


def _state(row: dict[str, Any]) -> str:
    """The state; for a parked engine, with the host RAM its weights hold meanwhile."""
    if row["state"] == "sleeping" and row.get("host_ram_mib"):
        return f"sleeping ({format_mib(row['host_ram_mib'])} RAM)"
    return str(row["state"])


def _kv_saved(row: dict[str, Any]) -> str:
    """The prompt cache saved on disk for the model's next start (persist_kv): "3406 tok, 53 MiB"."""
    tokens = row.get("kv_saved_tokens") or 0
    if not tokens:
        return "-"
    return f"{tokens} tok, {format_mib(row.get('kv_saved_bytes', 0) / (1024 * 1024))}"


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
@click.argument("name", shell_complete=complete_model_names)
@click.option("--json", "as_json", is_flag=True, help="print JSON (raw MiB)")
@click.pass_context
def plan(ctx: click.Context, name: str, as_json: bool) -> None:
    """What loading NAME now would need and do (nothing is loaded). Exits 1 if it does not fit now.

    A Hugging Face GGUF that is not downloaded yet is planned from its header, which the daemon
    reads from the Hub (a few MB of the file); progress shows if that takes a while."""
    _check_name(name)
    lines = daemon_for(ctx).stream_lines("GET", f"/v1/models/{name}/plan", params={"progress": "1"})
    planned = _follow_job(lines, "plan", lambda event: event["message"])
    if planned is None:
        fail(f"llmd's answer ended before the plan for {name}; its log may say why")
    report = planned["plan"]
    if as_json:
        echo_json(report)
    elif echo_plan(report):
        return
    if not report["fits"]:
        sys.exit(EXIT_FAILED)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON (raw MiB)")
@click.pass_context
def gpus(ctx: click.Context, as_json: bool) -> None:
    """The GPUs, their memory, which model holds what, and their temperature, power and load."""
    report = daemon_for(ctx).call("GET", "/v1/gpus")
    if as_json:
        echo_json(report)
        return
    click.echo(report["note"])
    rows = [
        [str(g["index"]), _gpu_name(g), format_mib(g["used_mib"]), format_mib(g["free_mib"]), format_mib(g["total_mib"]),
         ", ".join(f"{m['model']} {format_mib(m['vram_mib'])}" for m in g["models"]) or "-",
         format_mib(g["foreign_mib"]) if g["foreign_mib"] else "-"]
        for g in report["gpus"]
    ]
    if rows:
        click.echo(_table(rows, ["gpu", "name", "used", "free", "total", "llmd models", "others"]))
    for g in report["gpus"]:
        if g.get("endpoint") and not g.get("reachable", True):
            click.echo(f"\nGPU {g['index']} (RPC {g['endpoint']}) does not answer: {g.get('status') or 'unreachable'}; "
                       "nothing is placed on it until it does", err=True)
    _echo_gpu_telemetry(report["gpus"])


def _gpu_name(card: dict[str, Any]) -> str:
    """A card's name; a device of another machine with its endpoint, and "unreachable" while
    it does not answer."""
    endpoint = card.get("endpoint")
    if not endpoint:
        return str(card["name"])
    name = card["name"] if card["name"] == endpoint else f"{card['name']} {endpoint}"
    return f"{name} (rpc{'' if card.get('reachable', True) else ', unreachable'})"


def _echo_gpu_telemetry(cards: list[dict[str, Any]]) -> None:
    """A second table with each card's readings, "n/a" where a card gives none; left out when
    no card gives any (a simulated inventory without telemetry)."""
    from llmd.daemon.placement.telemetry import has_readings, telemetry_text  # only `gpus` needs it

    if not any(has_readings(card) for card in cards):
        return
    rows = []
    for card in cards:
        text = telemetry_text(card)
        rows.append([str(card["index"]), text["temperature"], f"{text['power']} / {text['power_limit']}",
                     text["utilization_gpu"], text["utilization_memory"], text["fan"], text["energy"]])
    click.echo()
    click.echo(_table(rows, ["gpu", "temp", "power / limit", "util", "mem util", "fan", "energy"]))


@main.command("ls")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def list_profiles(ctx: click.Context, as_json: bool) -> None:
    """Profiles the daemon found, valid or not."""
    profiles = daemon_for(ctx).call("GET", "/v1/profiles")["profiles"]
    if as_json:
        echo_json(profiles)
        return
    rows = [
        [p["name"], _dash(p["engine"]), "ok" if p["valid"] else "INVALID", _dash(p["state"]),
         ",".join(p["aliases"]) or "-", _dash(p["ttl"]), _dash(p.get("bench")), _dash(p["model"])]
        for p in profiles
    ]
    click.echo(_table(rows, ["name", "engine", "profile", "state", "aliases", "ttl", "bench", "model"]))
    for p in profiles:
        if not p["valid"]:
            kept = " (its model runs on the last good version)" if p["state"] in ("ready", "starting", "sleeping") else ""
            click.echo(f"\n{p['error']}{kept}", err=True)


@main.command()
@click.argument("name", shell_complete=complete_model_names)
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines")
@click.option("-n", "--lines", type=click.IntRange(0, MAX_LOG_LINES), default=DEFAULT_LOG_LINES, show_default=True,
              help="how many lines of the end to show")
@click.pass_context
def logs(ctx: click.Context, name: str, follow: bool, lines: int) -> None:
    """Print NAME's engine log."""
    _check_name(name)
    params = {"lines": lines, "follow": "1" if follow else "0"}

    def say_if_absent(response: Response) -> None:
        if response.header(LOG_ABSENT_HEADER):
            click.echo(f"llmctl: {name} has not run yet; waiting for its engine log", err=True)

    try:
        for chunk in daemon_for(ctx).stream_bytes(f"/v1/models/{name}/logs", say_if_absent, params=params):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    except KeyboardInterrupt:
        pass


# How many of the last requests `requests -f` shows before following, without -n.
FOLLOW_BACKLOG = 10
# `requests -f` prints rows as they come, so its columns have fixed widths (longer cells overflow).
_FOLLOW_WIDTHS = {"time": 8, "api": 6, "model": 16, "endpoint": 16, "status": 6, "client": 15, "ttft": 8,
                  "prompt": 6, "generated": 9, "duration": 8}


@main.command("requests")
@click.option("--json", "as_json", is_flag=True, help="print JSON (raw seconds; with -f, one object a line)")
@click.option("-f", "--follow", is_flag=True, help="keep printing requests as they finish (oldest first)")
@click.option("-n", "--limit", type=click.IntRange(0), default=None,
              help=f"how many of the newest to show (default: all kept; {FOLLOW_BACKLOG} with -f)")
@click.pass_context
def recent_requests(ctx: click.Context, as_json: bool, follow: bool, limit: int | None) -> None:
    """The last requests the proxy served, newest first: model, status, client, time to first token, tokens."""
    from llmd.daemon.util.request_cells import COLUMNS, request_cells  # only `requests` needs it

    daemon = daemon_for(ctx)
    off = "the request log is off ([server] request_log = 0 in llmd.toml)"
    if follow:
        if not daemon.call("GET", "/v1/requests", params={"limit": 0})["kept"]:
            fail(f"{off}: there is nothing to follow")
        params = {"follow": "1", "limit": FOLLOW_BACKLOG if limit is None else limit}
        if not as_json:
            click.echo("  ".join(column.upper().ljust(_FOLLOW_WIDTHS[column]) for column in COLUMNS).rstrip())
        try:
            for line in daemon.stream_lines("GET", "/v1/requests", params=params):
                if not line.strip():
                    continue
                if as_json:
                    click.echo(line)
                    continue
                cells = request_cells(json.loads(line))
                click.echo("  ".join(cells[column].ljust(_FOLLOW_WIDTHS[column]) for column in COLUMNS).rstrip())
        except KeyboardInterrupt:
            pass
        return
    answer = daemon.call("GET", "/v1/requests", params={} if limit is None else {"limit": limit})
    if not answer["kept"]:
        click.echo(f"llmctl: {off}", err=True)
    if as_json:
        echo_json(answer["requests"])
        return
    rows = [[request_cells(record)[column] for column in COLUMNS] for record in answer["requests"]]
    click.echo(_table(rows, list(COLUMNS)))


main.add_command(completion)
main.add_command(shutdown)
main.add_command(status)

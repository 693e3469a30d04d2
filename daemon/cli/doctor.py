"""`llmctl doctor`: check this host's llmd setup, one line per check. Runs without the daemon."""

from __future__ import annotations

import json
import sys

import anyio
import click
from llmd.drivers.registry import load_drivers

from llmd.daemon.cli.client import cli_config, fail, root_options
from llmd.daemon.cli.output import Progress
from llmd.daemon.diagnostics.doctor import (
    CheckResult,
    FoundEngine,
    User,
    check_engine,
    check_gpus,
    check_port,
    check_socket,
    check_state_dir,
    daemon_user,
    profiles_by_engine,
    smoke_engine,
)
from llmd.daemon.errors import LlmdError
from llmd.daemon.models.profiles import load_profiles

_MARK = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}
# Without a terminal, progress lines are printed at most this often (a log, not an animation).
_QUIET_PROGRESS_SECONDS = 5.0


def _echo(result: CheckResult) -> None:
    lines = result.detail.splitlines() or [""]
    click.echo(f"{_MARK[result.status]}  {result.check}: {lines[0]}")
    for line in lines[1:]:
        click.echo(f"        {line}")
    if result.fix and result.status != "ok":
        click.echo(f"        fix: {result.fix}")


@click.command()
@click.option("--engine", "engines", multiple=True, metavar="NAME", help="check (and smoke-test) only this engine; repeatable")
@click.option("--no-smoke", is_flag=True, help="skip the smoke inference (vLLM alone takes up to a minute on a CPU)")
@click.option("--user", "user_name", metavar="USER", help="the user llmd runs as (default: its socket's owner, else you)")
@click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
@click.pass_context
def doctor(ctx: click.Context, engines: tuple[str, ...], no_smoke: bool, user_name: str | None, as_json: bool) -> None:
    """Check engines, GPUs, permissions and ports, and smoke-test each engine; say how to fix what fails.

    Exit code 0 when no check failed (warnings included), 1 when one did.
    """
    try:
        config = cli_config(ctx)
    except LlmdError as exc:
        fail(str(exc))
    socket_path = root_options(ctx)["socket"] or config.server.socket
    drivers = load_drivers()
    unknown = sorted(set(engines) - set(drivers))
    if unknown:
        raise click.BadParameter(f"unknown engine {unknown[0]!r}; known: {', '.join(sorted(drivers))}", param_hint="--engine")
    try:
        user = daemon_user(socket_path, user_name)
    except LookupError as exc:
        raise click.BadParameter(f"{exc}; name the account llmd runs as (e.g. llmd)", param_hint="--user") from None
    selected = [FoundEngine.look_up(config, drivers[name]) for name in (engines or sorted(drivers))]
    profiles = load_profiles(config.server.profile_dirs, set(drivers), config.server.model_dirs)
    used = profiles_by_engine(profiles)
    report = _echo if not as_json else (lambda result: None)

    results: list[CheckResult] = []

    def add(result: CheckResult) -> None:
        results.append(result)
        report(result)

    gpu_result, gpu_count = check_gpus(config)
    add(gpu_result)
    for found in selected:
        add(check_engine(config, found, used.get(found.driver.name, []), gpu_count))
    for result in check_state_dir(config, user):
        add(result)
    add(check_socket(socket_path, User.current()))
    add(check_port("[server] listen", config.server.listen, "/v1/models"))
    if config.server.management_listen:
        add(check_port("[server] management_listen", config.server.management_listen, "/v1/ps"))
    if not no_smoke:
        progress = Progress(every=_QUIET_PROGRESS_SECONDS)
        for found in selected:
            if found.command is None:
                continue  # its engine check already says how to install it
            try:
                result = anyio.run(smoke_engine, config, found, progress)
            except KeyboardInterrupt:
                progress.clear()
                fail("interrupted; the smoke test's engine was stopped", 130)
            progress.clear()
            add(result)

    failed = sum(r.status == "fail" for r in results)
    if as_json:
        counts = {status: sum(r.status == status for r in results) for status in ("ok", "warn", "fail")}
        click.echo(json.dumps({"ok": not failed, "counts": counts, "checks": [r.as_dict() for r in results]}, indent=2))
    else:
        warned = sum(r.status == "warn" for r in results)
        click.echo(f"\n{len(results) - failed - warned} ok, {warned} warning(s), {failed} failed")
    sys.exit(1 if failed else 0)

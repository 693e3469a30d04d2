"""`llmctl status`: which daemon llmctl reaches, and where clients and browsers reach it."""

from __future__ import annotations

from typing import Any

import click

from llmd.daemon.cli.client import daemon_for
from llmd.daemon.cli.output import echo_json
from llmd.daemon.util.durations import format_duration


def status_lines(report: dict[str, Any], reached_at: str) -> list[tuple[str, str]]:
    """(label, text) rows of a `GET /v1/status` answer; `reached_at`: the socket llmctl used."""
    openai = report["openai_url"]
    if report.get("openai_url_remote"):
        openai += f" (from other hosts: {report['openai_url_remote']})"
    openai += "; API key required ([server] api_keys)" if report["api_key_required"] else "; no API key needed"
    management = report["socket"]
    if reached_at != report["socket"]:
        management += f" (reached at {reached_at})"
    if report.get("management_listen"):
        management += f", and http://{report['management_listen']} (with [server] management_token)"
    dashboard = report["dashboard"]
    count = report["profiles"]
    profiles = f"{', '.join(report['profile_dirs'])} ({count} profile{'' if count == 1 else 's'}"
    profiles += f", {report['invalid_profiles']} invalid: `llmctl ls` says why)" if report["invalid_profiles"] else ")"
    models = ", ".join(
        f"{m['model']} ({m['state']}" + (f", pid {m['pid']}, port {m['port']})" if m["pid"] else ")")
        for m in report["models"]
    ) or "none running"
    return [
        ("llmd", f"{report['version']}, pid {report['pid']}, up {format_duration(report['uptime_s'])}"),
        ("config", report["config"] or "none (the defaults)"),
        ("OpenAI API", openai),
        ("management", management),
        ("dashboard", dashboard["url"] or dashboard["how"]),
        ("profiles", profiles),
        ("engines", report["engines_dir"]),
        ("models", models),
    ]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON (raw seconds)")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """The daemon llmctl reaches: pid, version, uptime, addresses, dashboard, directories, models."""
    daemon = daemon_for(ctx)
    report = daemon.call("GET", "/v1/status")
    if as_json:
        echo_json(report)
        return
    rows = status_lines(report, str(daemon.socket_path))
    width = max(len(label) for label, _ in rows)
    for label, text in rows:
        click.echo(f"{label + ':':<{width + 1}}  {text}")

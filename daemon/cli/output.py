"""How `llmctl` prints: aligned tables with human units for people, raw JSON for scripts, and
progress on stderr while something runs."""

from __future__ import annotations

import json
import shutil
import sys
import time
from typing import Any

import click

from llmd.daemon.util.units import format_mib


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def dash(value: Any) -> str:
    return "-" if value is None or value == [] or value == "" else str(value)


# Carriage return, then erase the line: the next progress text replaces the last.
_REWRITE = "\r\x1b[2K"


class Progress:
    """Progress on stderr. On a terminal one line, rewritten in place and cut to the terminal's
    width (a wrapped line could not be erased); otherwise a plain line per message, at most one
    per `every` seconds, so that a log is not flooded."""

    def __init__(self, every: float = 0.0) -> None:
        self.interactive = sys.stderr.isatty()
        self.every = every
        self._printed_at: float | None = None

    def __call__(self, message: str) -> None:
        if self.interactive:
            width = shutil.get_terminal_size().columns
            click.echo(_REWRITE + message[: max(width - 1, 1)], err=True, nl=False)
        elif self._printed_at is None or time.monotonic() - self._printed_at >= self.every:
            self._printed_at = time.monotonic()
            click.echo(message, err=True)

    def clear(self) -> None:
        """Erase the progress line, before the result is printed."""
        if self.interactive:
            click.echo(_REWRITE, err=True, nl=False)

    def keep(self) -> None:
        """End the progress line, leaving it on screen above the error that follows."""
        if self.interactive:
            click.echo(err=True)


def echo_json(value: Any) -> None:
    """Raw values (MiB, seconds) for scripts; tables carry the human forms."""
    click.echo(json.dumps(value, indent=2))


def echo_plan(report: dict[str, Any]) -> bool:
    """Print a plan report (GET /v1/models/NAME/plan's shape) for people; return whether it fits."""
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
        return False
    gpus = ", ".join(f"GPU {g['index']}: {format_mib(g['vram_mib'])}" for g in report["gpus"]) or "CPU only"
    click.echo(f"  placement: {gpus}")
    if report["gpu_layers"] is not None and report["gpus"]:
        click.echo(f"  layers on GPU: {report['gpu_layers']}; MoE layers on CPU: {report['cpu_moe_layers']}")
    if report["evict"]:
        click.echo(f"  would evict: {', '.join(report['evict'])}")
    click.echo(f"  why: {report['reason']}")
    return True

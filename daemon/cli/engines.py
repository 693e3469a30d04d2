"""`llmctl engines`: install and list engines. Runs locally; it does not need the daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from llmd.daemon.cli.client import cli_config, fail
from llmd.daemon.cli.output import echo_json, table
from llmd.daemon.engines.commands import INSTALLABLE_ENGINES
from llmd.daemon.errors import LlmdError

# What each engine can run on, for the listing's "usable here" column.
_GPU_ONLY_FLAVOUR = "cuda"


def _host_gpus(simulate: Path | None) -> tuple[int, str]:
    """(number of GPUs, the inventory's note) as the daemon would see them: the `[gpus] simulate`
    snapshot when one is set, else NVML. Raises ConfigError for a bad snapshot, as the daemon
    does; a driver hiccup while reading real cards counts as no GPU, and never breaks a listing."""
    from llmd.daemon.placement.inventory import open_inventory

    inventory = open_inventory(simulate)
    try:
        count = len(inventory.snapshot())
    except Exception:  # noqa: BLE001  (an NVML error: report no GPU rather than fail)
        count = 0
    return count, inventory.note


def _usable(flavour: str, gpus: int) -> str:
    if flavour == _GPU_ONLY_FLAVOUR:
        return "yes (GPU)" if gpus else "no: needs an NVIDIA GPU"
    return "yes (CPU)"


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def engines(ctx: click.Context, as_json: bool) -> None:
    """List installed engines and what this host can run (or install one with `engines install`)."""
    if ctx.invoked_subcommand is not None:
        return
    from llmd.daemon.engines.provision import list_installed

    try:
        config = cli_config(ctx)
        installed = list_installed(config.server.engines_dir)
        gpus, note = _host_gpus(config.gpus.simulate)
    except LlmdError as exc:
        fail(str(exc))
    rows: list[dict[str, Any]] = [
        {
            "engine": e.engine,
            "version": e.version,
            "flavour": e.flavour,
            "path": str(e.path),
            "command": e.command,
            "built_at": e.built_at,
            "usable": _usable(e.flavour, gpus),
        }
        for e in installed
    ]
    available = [
        {"engine": name, "flavours": ["cpu", "cuda"] if gpus else ["cpu"],
         "installed": any(r["engine"] == name for r in rows)}
        for name in INSTALLABLE_ENGINES
    ]
    if as_json:
        echo_json({"host": {"gpus": gpus, "note": note}, "installed": rows, "available": available})
        return
    click.echo(f"host: {note}")
    if gpus:
        click.echo(f"  engines can run on the CPU or on the {gpus} GPU{'s' if gpus != 1 else ''} (install with --cuda)")
    else:
        click.echo("  CPU-only: engines run on the CPU (a --cuda install would not run here)")
    click.echo("")
    if not rows:
        click.echo("no engines installed")
    else:
        click.echo(table(
            [[r["engine"], r["version"], r["flavour"], r["usable"], " ".join(r["command"])] for r in rows],
            ["engine", "version", "flavour", "usable here", "command"],
        ))
    missing = [a["engine"] for a in available if not a["installed"]]
    if missing:
        flag = " [--cuda]" if gpus else ""
        click.echo("")
        click.echo("not installed: " + ", ".join(f"`llmctl engines install {name}{flag}`" for name in missing))


@engines.command()
@click.argument("engine", type=click.Choice(INSTALLABLE_ENGINES))
@click.option("--cuda", is_flag=True, help="install the CUDA build (llama-cpp: needs the CUDA toolkit)")
@click.pass_context
def install(ctx: click.Context, engine: str, cuda: bool) -> None:
    """Install ENGINE into llmd's engines directory (cached by version); prints its command."""
    from llmd.daemon.engines.provision import install_llama_cpp
    from llmd.daemon.engines.provision_venv import install_venv_engine
    from llmd.daemon.service.root_warning import root_warning

    def progress(message: str) -> None:
        click.echo(message, err=True)

    warning = root_warning("llmctl engines install", "pip and the build it runs execute the downloaded packages' code")
    if warning is not None:
        progress(f"llmctl: warning: {warning}")
    try:
        engines_dir = cli_config(ctx).server.engines_dir
        if engine == "llama-cpp":
            click.echo(str(install_llama_cpp(engines_dir, cuda=cuda, progress=progress)))
        else:
            installed = install_venv_engine(engines_dir, engine, cuda=cuda, progress=progress)
            click.echo(" ".join(installed.command))
    except LlmdError as exc:
        fail(str(exc))

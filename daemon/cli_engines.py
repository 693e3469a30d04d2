"""`llmctl engines`: build and list engines. Runs locally; it does not need the daemon."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .config import config_path_from_env, load_config
from .errors import LlmdError

INSTALLERS = ("llama-cpp",)


def _engines_dir(ctx: click.Context) -> Path:
    root = ctx.find_root().obj or {}
    return load_config(config_path_from_env(root.get("config"))).server.engines_dir


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def engines(ctx: click.Context, as_json: bool) -> None:
    """List installed engines (or install one with `engines install`)."""
    if ctx.invoked_subcommand is not None:
        return
    from .provision import list_installed

    try:
        installed = list_installed(_engines_dir(ctx))
    except LlmdError as exc:
        click.echo(f"llmctl: {exc}", err=True)
        sys.exit(1)
    rows = [
        {"engine": e.engine, "version": e.version, "flavour": e.flavour, "path": str(e.path), "built_at": e.built_at}
        for e in installed
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no engines installed; run `llmctl engines install llama-cpp`")
    for row in rows:
        click.echo(f"{row['engine']:<10} {row['version']:<12} {row['flavour']:<5} {row['path']}")


@engines.command()
@click.argument("engine", type=click.Choice(INSTALLERS))
@click.option("--cuda", is_flag=True, help="build with CUDA (needs the CUDA toolkit)")
@click.pass_context
def install(ctx: click.Context, engine: str, cuda: bool) -> None:
    """Build ENGINE into llmd's engines directory (cached by version)."""
    from .provision import install_llama_cpp

    try:
        binary = install_llama_cpp(_engines_dir(ctx), cuda=cuda, progress=lambda m: click.echo(m, err=True))
    except LlmdError as exc:
        click.echo(f"llmctl: {exc}", err=True)
        sys.exit(1)
    click.echo(str(binary))

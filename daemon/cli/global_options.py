"""llmctl's global options (--socket, --config) after a subcommand's name as well as before it:
`llmctl ps --socket X` works like `llmctl --socket X ps`.

Every subcommand gets the two options, hidden from its help (the top-level help lists them).
Given there, a value is kept in the command line's shared `ctx.meta`, where
`client.root_options` finds it before the top-level one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from llmd.daemon.cli.client import GIVEN_OPTIONS

_MARK = "_llmctl_global_options"


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None and param.name is not None:
        ctx.meta.setdefault(GIVEN_OPTIONS, {})[param.name] = value
    return value


def _options() -> list[click.Option]:
    return [
        click.Option(["--socket", "socket_path"], type=click.Path(path_type=Path), hidden=True,
                     expose_value=False, callback=_remember, help="llmd's management socket"),
        click.Option(["--config", "config_path"], type=click.Path(path_type=Path, dir_okay=False), hidden=True,
                     expose_value=False, callback=_remember, help="llmd.toml to read paths from"),
    ]


def accept_global_options(command: click.Command) -> None:
    """Let `command`, and every command under it, take --socket and --config (once)."""
    if getattr(command, _MARK, False):
        return
    setattr(command, _MARK, True)
    taken = {opt for param in command.params for opt in getattr(param, "opts", ())}
    command.params.extend(option for option in _options() if not taken & set(option.opts))
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            accept_global_options(sub)

"""A click group whose heavier subcommands are imported only when one of them runs.

`llmctl --help` and completing a command's name list every subcommand with its one-line help;
for the lazy ones that line comes from a table here rather than from importing the command
(tests/test_cli_imports.py checks that the two agree).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import click

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem

# Set in ctx.meta (shared by a whole command line's contexts) while subcommands are only listed.
_LISTING = "llmctl.listing"
# What an unknown command name raises, with close names to suggest (click 8.4 and later).
_NoSuchCommand: Any = getattr(click, "NoSuchCommand", ())


class LazyCommand(NamedTuple):
    """Where a subcommand lives ("package.module", "attribute") and its help's first line."""

    module: str
    attribute: str
    summary: str


class LazyGroup(click.Group):
    """A group with the subcommands of `lazy` ({name: LazyCommand}) besides its own: each is
    imported when it is invoked, or completed into; listing them shows their `summary`.
    `prepare` is applied to each command (a lazy one once it is imported) before it is used."""

    def __init__(self, *args: Any, lazy: Mapping[str, LazyCommand],
                 prepare: Callable[[click.Command], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy)
        self.prepare = prepare

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = self.lazy.get(cmd_name)
        if entry is None or cmd_name in self.commands:
            command = super().get_command(ctx, cmd_name)
        elif ctx.meta.get(_LISTING):
            return click.Command(cmd_name, help=entry.summary)
        else:
            command = getattr(importlib.import_module(entry.module), entry.attribute)
            self.add_command(command, cmd_name)
        if command is not None and self.prepare is not None:
            self.prepare(command)
        return command

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except _NoSuchCommand as exc:
            # click looks for a close name ("Did you mean 'bench'?") among the imported commands only.
            raise _NoSuchCommand(exc.command_name, possibilities=self.list_commands(ctx), ctx=ctx) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with _listing(ctx):
            super().format_commands(ctx, formatter)

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list[CompletionItem]:
        with _listing(ctx):
            return super().shell_complete(ctx, incomplete)


@contextlib.contextmanager
def _listing(ctx: click.Context) -> Iterator[None]:
    ctx.meta[_LISTING] = True
    try:
        yield
    finally:
        del ctx.meta[_LISTING]

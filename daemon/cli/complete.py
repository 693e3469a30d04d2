"""Shell completion for `llmctl` (bash, zsh, fish), through click's own completion support.

Model names complete from the running daemon when it answers within a moment, else from the
profile files named by llmd.toml, so completion works with the daemon stopped too.
"""

from __future__ import annotations

import click
from click.shell_completion import CompletionItem, get_completion_class

from llmd.daemon.cli.client import Daemon, DaemonUnreachable, cli_config, locate_socket
from llmd.daemon.errors import LlmdError

SHELLS = ("bash", "zsh", "fish")
PROG = "llmctl"
COMPLETE_VAR = "_LLMCTL_COMPLETE"
# A shell waits for completions: ask the daemon only briefly before reading the files instead.
DAEMON_TIMEOUT = 0.3


def _names_from_daemon(ctx: click.Context) -> list[str] | None:
    try:
        daemon = Daemon(locate_socket(ctx, warn=False).path, timeout=DAEMON_TIMEOUT)
        response = daemon.query("GET", "/v1/profiles")
        if response.status_code != 200:
            return None
        rows = response.json()["profiles"]
    except (DaemonUnreachable, LlmdError, ValueError, KeyError):
        return None
    return [name for row in rows if row.get("valid") for name in (row["name"], *row.get("aliases", []))]


def _names_from_files(ctx: click.Context) -> list[str]:
    from llmd.daemon.models.profiles import load_profiles

    try:
        config = cli_config(ctx)
    except LlmdError:
        return []
    found = load_profiles(config.server.profile_dirs, None, ())
    return [name for profile in found.profiles.values() for name in (profile.name, *profile.aliases)]


def complete_model_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Profile names and aliases starting with `incomplete`."""
    names = _names_from_daemon(ctx)
    if names is None:
        names = _names_from_files(ctx)
    return [CompletionItem(name) for name in sorted(set(names)) if name.startswith(incomplete)]


def complete_engines(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    from llmd.daemon.models.profile_writer import installed_engines

    return [CompletionItem(name) for name in installed_engines() if name.startswith(incomplete)]


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the completion script for SHELL (bash, zsh or fish); docs/cli.md says where to put it.

    \b
    bash:  llmctl completion bash > ~/.local/share/bash-completion/completions/llmctl
    zsh:   llmctl completion zsh > ~/.zfunc/_llmctl   (with fpath+=~/.zfunc before compinit)
    fish:  llmctl completion fish > ~/.config/fish/completions/llmctl.fish
    """
    shell_class = get_completion_class(shell)
    assert shell_class is not None  # every name in SHELLS is one click supports
    click.echo(shell_class(ctx.find_root().command, {}, PROG, COMPLETE_VAR).source())

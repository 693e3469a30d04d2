"""Stopping the daemon when the management API is asked to (`llmctl shutdown`), the way SIGTERM
stops it: in-flight requests finish, then every engine stops.

A daemon that systemd runs is left to systemd: stopped behind its back, the unit would look
failed or, with `Restart=always`, start again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Beyond the graces the config sets: saving prompt caches, closing the listeners, exiting.
STOP_MARGIN_S = 30.0


@dataclass(frozen=True)
class Shutdown:
    """`begin(who)` starts the graceful stop (`who` asked, for the log); `systemd_variable` is
    what `started_by_systemd()` said at startup; `within_s` bounds how long stopping takes."""

    begin: Callable[[str], None]
    systemd_variable: str | None
    within_s: float

    def refusal(self) -> str | None:
        """Why the API must not stop this daemon, or None when it may."""
        if self.systemd_variable is None:
            return None
        return (f"llmd runs under systemd (${self.systemd_variable} was set when it started): "
                "stop it with `systemctl stop llmd`, so that systemd knows it stopped")


def stop_within(shutdown_grace: float, api_grace: float, stop_grace: float) -> float:
    """The longest a graceful stop takes: requests finish (the listeners drain side by side),
    then the engines get their SIGTERM-to-SIGKILL grace, plus a margin for the rest."""
    return max(shutdown_grace, api_grace) + stop_grace + STOP_MARGIN_S

"""`llmd uninstall`: undo `llmd install`, keeping models, state and config unless --purge."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from llmd.daemon.service import accounts, directories, systemctl
from llmd.daemon.service.executables import this_llmd
from llmd.daemon.service.files import remove_file
from llmd.daemon.service.layout import (
    SERVICE_USER,
    SYSUSERS_SNIPPET,
    TMPFILES_SNIPPET,
    UNIT,
    UNIT_DROPINS,
    WANTS_LINK,
    Target,
    shipped_text,
)
from llmd.daemon.service.preflight import check_can_change
from llmd.daemon.service.progress import Step, run_steps
from llmd.daemon.service.tools import ServiceSetupError


def _removed(target: Target, *paths: Path) -> list[str]:
    said = []
    for absolute in paths:
        path = target.path(absolute)
        said.append(f"{path}: {'removed' if remove_file(path) else 'not there'}")
    return said


def _remove_unit(target: Target) -> list[str]:
    # `systemctl disable` removed the wants link; a link left by hand (or a unit file removed
    # before disabling) would keep pointing at nothing.
    said = _removed(target, UNIT, WANTS_LINK)
    if target.live:
        systemctl.systemctl(target, "daemon-reload")
        said.append("systemctl daemon-reload: done")
    return said


def _purge_data(target: Target, purge: bool) -> list[str]:
    kept = directories.top_directories(shipped_text("llmd.tmpfiles.conf"))
    if not purge:
        return [f"kept {target.path(path)}" for path in kept] + ["(--purge removes them: config, profiles, models, engines)"]
    said = []
    for path in [*kept, UNIT_DROPINS]:
        shown = target.path(path)
        said.append(f"{shown}: {'removed' if directories.remove_tree(shown) else 'not there'}")
    return said


def uninstall(target: Target, *, purge: bool, remove_user: bool, echo: Callable[[str], None]) -> None:
    """Take the llmd service off `target`, printing each step through `echo`."""
    check_can_change(target, this_llmd(), "uninstall")
    if remove_user and not purge:
        raise ServiceSetupError("--remove-user needs --purge: the kept files would belong to a user that no longer exists")
    steps: list[Step] = [
        ("stop and disable the service", lambda: systemctl.stop_and_disable(target)),
        (f"unit {UNIT}", lambda: _remove_unit(target)),
        ("sysusers.d and tmpfiles.d snippets", lambda: _removed(target, SYSUSERS_SNIPPET, TMPFILES_SNIPPET)),
        ("config, state and models", lambda: _purge_data(target, purge)),
        (f"user and group {SERVICE_USER}",
         lambda: accounts.remove_account(target, SERVICE_USER) if remove_user else ["kept (--purge --remove-user removes them)"]),
    ]
    run_steps(steps, echo)
    echo("done")

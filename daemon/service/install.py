"""`llmd install`: the llmd user, its directories, the config, engines and the unit, in one go.

Every step compares before it writes, so running it again reports "unchanged" and touches no
file. The order matters: the user must exist before systemd-tmpfiles gives it directories,
and the directories before the config and the engine builds go into them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from llmd.daemon.service import accounts, directories, systemctl
from llmd.daemon.service.executables import hidden_from_service, sibling_llmctl, this_llmd, unreachable_by_others
from llmd.daemon.service.files import create_once, ensure_file
from llmd.daemon.service.layout import (
    CONFIG,
    SERVICE_USER,
    SYSUSERS_SNIPPET,
    TMPFILES_SNIPPET,
    UNIT,
    Target,
    shipped_text,
)
from llmd.daemon.service.preflight import check_can_change
from llmd.daemon.service.progress import Step, run_steps
from llmd.daemon.service.tools import ServiceSetupError, run_tool_live
from llmd.daemon.service.unit import checkout_readme, render_unit

STATE_DIR = Path("/var/lib/llmd")


def engine_build_argv(llmctl: Path, engine: str, *, cuda: bool) -> list[str]:
    """`llmctl engines install ENGINE` as the llmd user, so the build lands in the service's
    engines_dir owned by the account that runs it."""
    argv = ["runuser", "-u", SERVICE_USER, "--", str(llmctl), "--config", str(CONFIG), "engines", "install", engine]
    return [*argv, "--cuda"] if cuda else argv


def _check_engines(target: Target, engines: Sequence[str], cuda: bool) -> None:
    from llmd.daemon.engines.commands import INSTALLABLE_ENGINES

    unknown = [e for e in engines if e not in INSTALLABLE_ENGINES]
    if unknown:
        raise ServiceSetupError(f"unknown engine {', '.join(unknown)}: choose from {', '.join(INSTALLABLE_ENGINES)}")
    if cuda and not engines:
        raise ServiceSetupError("--cuda applies to --engines: name the engines to build")
    if engines and not target.live:
        # An engine's venv and build record absolute paths, which would be wrong inside an image.
        raise ServiceSetupError("--engines builds on the running system; run `llmd install --engines ...` there, without --root")


class _Installer:
    def __init__(self, target: Target, llmd: Path) -> None:
        self.target = target
        self.llmd = llmd
        self.unit_changed = False

    def accounts(self) -> list[str]:
        path = self.target.path(SYSUSERS_SNIPPET)
        snippet = shipped_text("llmd.sysusers.conf")
        outcome = ensure_file(path, snippet)
        said = [f"{path}: {outcome}"]
        # Without a root's /etc, systemd-sysusers cannot take its lock.
        self.target.path(Path("/etc")).mkdir(parents=True, exist_ok=True)
        if outcome == "unchanged" and accounts.accounts_in_place(self.target, snippet):
            return [*said, f"user and group {SERVICE_USER}: unchanged"]
        return said + (accounts.create_accounts(self.target) or ["systemd-sysusers: nothing to add"])

    def directories(self) -> list[str]:
        path = self.target.path(TMPFILES_SNIPPET)
        snippet = shipped_text("llmd.tmpfiles.conf")
        said = [f"{path}: {ensure_file(path, snippet)}"]
        return said + directories.create_directories(self.target, snippet)

    def config(self) -> list[str]:
        path = self.target.path(CONFIG)
        if create_once(path, shipped_text("llmd.toml")):
            return [f"{path}: created; add profiles to {CONFIG.parent / 'profiles'}"]
        return [f"kept existing {path}"]

    def engine(self, engine: str, cuda: bool) -> list[str]:
        run_tool_live(engine_build_argv(sibling_llmctl(self.llmd), engine, cuda=cuda), cwd=STATE_DIR)
        return [f"engine {engine}: installed{' (CUDA)' if cuda else ''}"]

    def unit(self) -> list[str]:
        path = self.target.path(UNIT)
        outcome = ensure_file(path, render_unit(self.llmd, checkout_readme()))
        self.unit_changed = outcome != "unchanged"
        said = [f"{path}: {outcome} (ExecStart={self.llmd} serve --config {CONFIG})"]
        blocked = unreachable_by_others(self.llmd)
        if blocked is not None:
            said.append(f"warning: the {SERVICE_USER} user cannot reach {blocked}; install llmd where "
                        "other users can run it, e.g. a venv in /opt/llmd")
        hidden = hidden_from_service(self.llmd)
        if hidden is not None:
            said.append(f"warning: the unit's ProtectHome=yes hides {hidden} from the service, so it cannot "
                        f"run {self.llmd}; install llmd outside it, e.g. a venv in /opt/llmd")
        return said

    def systemd(self, start: bool) -> list[str]:
        if not self.target.live:
            return [systemctl.enable(self.target), "daemon-reload and start skipped (--root)"]
        systemctl.systemctl(self.target, "daemon-reload")
        said = ["systemctl daemon-reload: done", systemctl.enable(self.target)]
        said.append(systemctl.start(self.target, unit_changed=self.unit_changed) if start else "not started (--no-start)")
        return said


def install(target: Target, engines: Sequence[str], *, cuda: bool, start: bool,
            echo: Callable[[str], None]) -> None:
    """Set llmd up as a service on `target`, printing each step through `echo`."""
    llmd = this_llmd()
    check_can_change(target, llmd, "install")
    _check_engines(target, engines, cuda)
    if target.root is not None:
        target.root.mkdir(parents=True, exist_ok=True)
    installer = _Installer(target, llmd)
    steps: list[Step] = [
        (f"user and group {SERVICE_USER} (systemd-sysusers)", installer.accounts),
        ("directories (systemd-tmpfiles)", installer.directories),
        (f"config {CONFIG}", installer.config),
        *[(f"engine {engine}: building as {SERVICE_USER} (this can take several minutes)",
           lambda engine=engine: installer.engine(engine, cuda)) for engine in engines],
        (f"unit {UNIT}", installer.unit),
        ("systemd: enable" + (" and start" if start and target.live else ""), lambda: installer.systemd(start)),
    ]
    run_steps(steps, echo)
    if target.live:
        echo(f"done: `llmctl --config {CONFIG} ps` talks to it; `usermod -aG {SERVICE_USER} USER` "
             "lets USER use llmctl without sudo (after logging in again)")
    else:
        echo(f"done: {target.root} holds the service, enabled; it starts when that system boots")

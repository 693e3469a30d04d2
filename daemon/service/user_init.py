"""`llmd init` for a user without root: a commented llmd.toml and a `systemctl --user` unit.

Files that exist are never overwritten: an edited config or unit stays as it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from llmd.daemon.config_paths import CONFIG_ENV, default_config_dir
from llmd.daemon.service.user_unit import user_unit_path, user_unit_text


def config_target(explicit: Path | None) -> Path:
    """The llmd.toml `llmd init` sets up: --config, else $LLMD_CONFIG, else the user's."""
    if explicit is not None:
        return explicit
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else default_config_dir() / "llmd.toml"


def _write_new(path: Path, text: str) -> bool:
    """Write `path` unless it exists; True if written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("x", encoding="utf-8") as fh:
            fh.write(text)
    except FileExistsError:
        return False
    return True


def write_user_config(path: Path, echo: Callable[[str], None]) -> None:
    from llmd.daemon.config_template import user_config_text

    if _write_new(path, user_config_text()):
        echo(f"config: {path} (written: every key commented out, with its default)")
    else:
        echo(f"config: {path} (exists, kept)")


def write_user_unit(config: Path, echo: Callable[[str], None]) -> None:
    """The unit runs the llmd that runs now, with `config`."""
    from llmd.daemon.service.executables import this_llmd
    from llmd.daemon.service.tools import ServiceSetupError

    unit = user_unit_path()
    if unit.exists():
        echo(f"systemd user unit: {unit} (exists, kept)")
        return
    try:
        llmd = this_llmd()
    except ServiceSetupError as exc:
        echo(f"systemd user unit: not written ({exc})")
        return
    _write_new(unit, user_unit_text(llmd, config.absolute()))
    echo(f"systemd user unit: {unit} (written); start llmd with it now and at every login:\n"
         "  systemctl --user daemon-reload && systemctl --user enable --now llmd")

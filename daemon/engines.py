"""Find the executable behind an engine's argv prefix."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llmd.drivers.base import Driver

from .config import DaemonConfig
from .errors import EngineNotInstalledError


def resolve_command(config: DaemonConfig, driver: Driver) -> list[str]:
    """`[engines.NAME] command` (or the driver's default) with its first item made an executable path.

    When the default command is not on PATH, an engine installed by `llmctl engines install`
    is used instead, so a fresh install needs no PATH edits.
    """
    configured = config.engine(driver.name).command
    command = list(configured or driver.default_command)
    exe = command[0]
    if os.sep in exe:
        path = Path(exe)
        if path.is_file() and os.access(path, os.X_OK):
            return command
        raise EngineNotInstalledError(
            f"engine {driver.name!r}: {exe} does not exist or is not executable; "
            f"fix [engines.{driver.name}] command in llmd.toml"
        )
    found = shutil.which(exe)
    if found:
        return [found, *command[1:]]
    if configured is None or command == driver.default_command:
        from .provision import find_installed_binary

        installed = find_installed_binary(config.server.engines_dir, driver.name)
        if installed is not None:
            return [str(installed), *command[1:]]
    raise EngineNotInstalledError(
        f"engine {driver.name!r}: {exe!r} is not on PATH and no built copy is in "
        f"{config.server.engines_dir}; run `llmctl engines install {driver.name}`, "
        f"or set [engines.{driver.name}] command in llmd.toml"
    )

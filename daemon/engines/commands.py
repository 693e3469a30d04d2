"""The engines llmd can install, and finding the executable behind an engine's argv prefix."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llmd.drivers.base import Driver

from llmd.daemon.config import DaemonConfig
from llmd.daemon.errors import EngineNotInstalledError
from llmd.daemon.engines.provision import LLAMA_CPP, find_installed_command
from llmd.daemon.engines.provision_venv import VENV_ENGINES

# What `llmctl engines install` installs; `llmctl engines`, doctor and the fixes they suggest
# all go by this list. Other engines come from third-party drivers.
INSTALLABLE_ENGINES = (LLAMA_CPP, *VENV_ENGINES)


def resolve_command(config: DaemonConfig, driver: Driver) -> list[str]:
    """`[engines.NAME] command` (or the driver's default) with its first item made an executable path.

    When the driver's default command is not on PATH, an engine installed by `llmctl engines
    install` is used instead, so a fresh install needs no PATH edits. Such an install supplies
    its whole argv prefix, which may differ from the default beyond the executable: fastllm's is
    `[.../venv/bin/ftllm, "server"]`, vLLM's `[.../venv/bin/python, "-m",
    "vllm.entrypoints.openai.api_server"]` in place of `["vllm", "serve"]`.
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
    if configured is None or command == list(driver.default_command):
        installed = find_installed_command(config.server.engines_dir, driver.name)
        if installed is not None:
            return installed
    fixes = f"set [engines.{driver.name}] command in llmd.toml"
    if driver.name in INSTALLABLE_ENGINES:
        fixes = f"run `llmctl engines install {driver.name}`, or {fixes}"
    raise EngineNotInstalledError(
        f"engine {driver.name!r}: {exe!r} is not on PATH and no installed copy is in "
        f"{config.server.engines_dir}; {fixes}"
    )

"""What is installed under the engines directory, read from each install's manifest.

Only the standard library: `llmd --version` and `llmctl --version` list the engines without
loading the installers (which need an HTTP client) or anything else of llmd.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from llmd.daemon.engines.versions import LLAMA_CPP

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class InstalledEngine:
    """One complete install found under the engines directory."""

    engine: str
    version: str
    flavour: str
    # The executable to run.
    path: Path
    built_at: str
    # Arguments that follow `path` to make the engine's argv prefix, such as ["server"] for
    # fastllm's `ftllm server`, or ["-m", "vllm.entrypoints.openai.api_server"].
    command_args: tuple[str, ...] = ()

    @property
    def command(self) -> list[str]:
        """The argv prefix before the model arguments, as `[engines.NAME] command` would give it."""
        return [str(self.path), *self.command_args]


def _binary_name(engine: str) -> str:
    """The binary of a manifest that predates the `binary` field (only llama-cpp ones do)."""
    if engine != LLAMA_CPP:
        raise ValueError(f"install manifest for {engine!r} names no binary")
    return "llama-server"


def read_install(root: Path) -> InstalledEngine | None:
    """The install in `root`, or None when it is not a complete install."""
    try:
        data = json.loads((root / MANIFEST).read_text())
        engine, version, flavour = str(data["engine"]), str(data["version"]), str(data["flavour"])
        # Only manifests from before the `binary` field lack it, and those are all llama-cpp.
        binary = root / str(data["binary"] if "binary" in data else f"bin/{_binary_name(engine)}")
        command_args = tuple(str(arg) for arg in data.get("command_args", []))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return None
    return InstalledEngine(engine, version, flavour, binary, str(data.get("built_at", "")), command_args)


def version_key(version: str) -> tuple[tuple[int, str], ...]:
    """Sort key for versions like 11434.0.0: numeric parts compare as numbers."""
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.+-]", version))


def list_installed(engines_dir: Path) -> list[InstalledEngine]:
    """Every complete install under `engines_dir`, by engine, then newest version first."""
    found: list[InstalledEngine] = []
    root = Path(engines_dir)
    if not root.is_dir():
        return found
    for engine_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for candidate in sorted(engine_dir.iterdir()):
            if candidate.name.startswith(".") or not candidate.is_dir():
                continue
            installed = read_install(candidate)
            if installed is not None:
                found.append(installed)
    found.sort(key=lambda e: (e.engine, tuple(-n for n, _ in version_key(e.version)), e.flavour))
    return found

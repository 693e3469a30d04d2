"""The few paths of `llmd.toml` that llmctl needs before anything else (the socket, the engines
directory), read without validating the rest of the file.

Validating the whole config takes longer than the rest of a quick command, and a config that
fails validation must not keep llmctl from a daemon that answers. Only the standard library.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PeekedPaths:
    """What `[server]` names (None: not named, so the default applies), or why the file could
    not be read that simply (`problem`, one line; the paths are then None)."""

    socket: Path | None = None
    engines_dir: Path | None = None
    problem: str | None = None


def peek_paths(config_path: Path) -> PeekedPaths:
    """`[server] socket` and `engines_dir` of `config_path`, resolved as `load_config` resolves them."""
    try:
        with config_path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return PeekedPaths(problem="the file does not exist")
    except OSError as exc:
        return PeekedPaths(problem=f"cannot read it ({exc.strerror or exc})")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return PeekedPaths(problem=f"not valid TOML ({exc})")
    server = data.get("server", {})
    if not isinstance(server, dict):
        return PeekedPaths(problem="[server] is not a table")
    paths: dict[str, Path | None] = {}
    for key in ("socket", "engines_dir"):
        value = server.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            return PeekedPaths(problem=f"[server] {key} must be a path (a non-empty string)")
        paths[key] = Path(value) if value else None
    socket = paths["socket"]
    if socket is not None and not socket.is_absolute():
        socket = (config_path.parent / socket).resolve()  # relative to the file, as load_config does
    return PeekedPaths(socket=socket, engines_dir=paths["engines_dir"])

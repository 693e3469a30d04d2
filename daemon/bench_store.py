"""The last `llmctl bench` result of each profile, kept in the daemon's state dir.

One JSON file per profile, `state_dir/bench/NAME.json`, so that `llmctl ls` and the dashboard
can show the tokens/s a model reached on this machine next to its profile.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def bench_path(state_dir: Path, name: str) -> Path:
    return state_dir / "bench" / f"{name}.json"


def read_bench(state_dir: Path, name: str) -> dict[str, Any] | None:
    """The profile's last bench result, or None if it was never benched (or the file is unreadable)."""
    path = bench_path(state_dir, name)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable bench result %s (%s)", path, exc)
        return None
    return result if isinstance(result, dict) else None


def bench_headline(state_dir: Path, name: str) -> str | None:
    """The headline of the profile's last bench ("46.1 tok/s gen, ..."), or None."""
    result = read_bench(state_dir, name)
    headline = result.get("headline") if result is not None else None
    return headline if isinstance(headline, str) and headline else None


def write_bench(state_dir: Path, name: str, result: dict[str, Any]) -> Path:
    """Store `result` as the profile's latest bench, atomically: a reader never sees half a file."""
    path = bench_path(state_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path

"""The last `llmctl bench` result of each profile, kept in the daemon's state dir.

One JSON file per profile, `state_dir/bench/NAME.json`, so that `llmctl ls` and the dashboard
can show the tokens/s a model reached on this machine next to its profile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmd.daemon.util.atomic_write import write_json_atomic
from llmd.daemon.util.state_file import expect, read_state


def bench_path(state_dir: Path, name: str) -> Path:
    return state_dir / "bench" / f"{name}.json"


def read_bench(state_dir: Path, name: str) -> dict[str, Any] | None:
    """The profile's last bench result, or None if it was never benched (a damaged file is
    logged and moved aside)."""
    return read_state(bench_path(state_dir, name), _parse_bench)


def _parse_bench(result: Any) -> dict[str, Any]:
    """A bench result as `store_bench` accepts one: an object with a headline and rows."""
    expect(result, dict, "the bench result")
    expect(result["headline"], str, "headline")
    expect(result["rows"], list, "rows")
    return result


def bench_headline(state_dir: Path, name: str) -> str | None:
    """The headline of the profile's last bench ("46.1 tok/s gen, ..."), or None."""
    result = read_bench(state_dir, name)
    headline = result.get("headline") if result is not None else None
    return headline if isinstance(headline, str) and headline else None


class HeadlineCache:
    """Bench headlines for a page that polls them every second or two: a file is read again only
    when it changed on disk, so an unchanged result costs one stat.

    A changed file is told by its inode, size and mtime; `write_bench` always puts a new inode
    in place, so even a rewrite within the file system's timestamp granularity is seen."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[tuple[int, int, int], str | None]] = {}

    def headline(self, state_dir: Path, name: str) -> str | None:
        """`bench_headline(state_dir, name)`, read from disk only when the file changed."""
        path = bench_path(state_dir, name)
        try:
            st = path.stat()
        except FileNotFoundError:
            self._seen.pop(path, None)
            return None
        except OSError:
            return bench_headline(state_dir, name)  # unreadable: let it log why and move it aside, and cache nothing
        version = (st.st_ino, st.st_size, st.st_mtime_ns)
        seen = self._seen.get(path)
        if seen is not None and seen[0] == version:
            return seen[1]
        headline = bench_headline(state_dir, name)
        self._seen[path] = (version, headline)
        return headline


def write_bench(state_dir: Path, name: str, result: dict[str, Any]) -> Path:
    """Store `result` as the profile's latest bench, atomically: a reader never sees half a file."""
    return write_json_atomic(bench_path(state_dir, name), result, indent=1, sort_keys=True)

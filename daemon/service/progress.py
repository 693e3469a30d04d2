"""Numbered steps, each printing what it did, so a long install shows where it is."""

from __future__ import annotations

from collections.abc import Callable, Sequence

# A step's title and its action, which returns what it did (one line each).
Step = tuple[str, Callable[[], list[str]]]


def run_steps(steps: Sequence[Step], echo: Callable[[str], None]) -> None:
    """Run `steps` in order, printing "[n/total] title" before each and its lines after."""
    for number, (title, action) in enumerate(steps, 1):
        echo(f"[{number}/{len(steps)}] {title}")
        for line in action():
            echo(f"    {line}")

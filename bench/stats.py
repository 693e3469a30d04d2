"""Percentiles and the `Figure` every measurement reports."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks, like numpy's default."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def blocks(values: Sequence[float], count: int) -> list[list[float]]:
    """`values` cut into `count` consecutive blocks of (nearly) equal size, none empty."""
    count = max(1, min(count, len(values)))
    size = len(values) / count
    return [list(values[round(i * size): round((i + 1) * size)]) for i in range(count)]


def over_blocks(
    samples: dict[str, Sequence[float]], figure: Callable[[dict[str, Sequence[float]]], float], count: int
) -> list[float]:
    """`figure` computed on each of `count` consecutive blocks of the samples.

    The samples of all targets were taken interleaved, so block i of each target covers the same
    stretch of time: how much the figure varies from block to block shows how much it drifts as
    the machine's load changes.
    """
    cut = {name: blocks(values, count) for name, values in samples.items()}
    n = min(len(parts) for parts in cut.values())
    return [figure({name: parts[i] for name, parts in cut.items()}) for i in range(n)]


@dataclass
class Figure:
    """One reported number: its value, the spread over repetitions, and its goal if it has one.

    `low`/`high` are the smallest and largest value the figure took over the repetitions (blocks
    of samples, rounds, or runs) it was computed from; `met` is None when there is no goal or it
    could not be judged (a baseline was missing).
    """

    key: str
    label: str
    value: float
    unit: str
    low: float | None = None
    high: float | None = None
    goal: str | None = None
    met: bool | None = None
    samples: int | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def fmt(value: float | None, unit: str = "") -> str:
    """A number at a precision that suits its size."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if unit == "ratio":
        text = f"{value:.3f}"
    elif magnitude >= 100:
        text = f"{value:.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    elif magnitude >= 0.1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return text

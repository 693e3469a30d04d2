"""Sections of results, the printed table, and the JSON document."""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from .stats import Figure, fmt


@dataclass
class Section:
    """What one measurement produced: its figures, supporting numbers, and notes for the reader."""

    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "figures": [f.as_dict() for f in self.figures],
            "details": self.details,
            "notes": self.notes,
        }


def machine() -> dict:
    """What the numbers were measured on."""
    info: dict = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def _status(figure: Figure) -> str:
    if figure.goal is None:
        return ""
    if figure.met is None:
        return "n/a"
    return "met" if figure.met else "MISSED"


def _spread(figure: Figure) -> str:
    if figure.low is None or figure.high is None:
        return ""
    return f"{fmt(figure.low, figure.unit)} .. {fmt(figure.high, figure.unit)}"


def table_rows(sections: list[Section]) -> list[list[str]]:
    rows = [["figure", "value", "unit", "spread (min .. max)", "goal", "status"]]
    for section in sections:
        for figure in section.figures:
            rows.append([
                figure.label,
                fmt(figure.value, figure.unit),
                "" if figure.unit == "ratio" else figure.unit,
                _spread(figure),
                figure.goal or "",
                _status(figure),
            ])
    return rows


def text_table(sections: list[Section]) -> str:
    rows = table_rows(sections)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(sections: list[Section]) -> str:
    rows = table_rows(sections)
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]
    return "\n".join(out)


def _finite(value: object) -> object:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(document), indent=1) + "\n")

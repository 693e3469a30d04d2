"""Human units for tables: memory in MiB/GiB."""

from __future__ import annotations


def format_mib(mib: float | None) -> str:
    """"512 MiB", "1.5 GiB", "-" for None."""
    if mib is None:
        return "-"
    if abs(mib) < 1024:
        return f"{mib:.0f} MiB"
    return f"{mib / 1024:.1f} GiB"

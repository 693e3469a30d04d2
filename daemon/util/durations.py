"""Human durations such as "30m" or "1h30m", used by profile policies."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
NEVER = ("never", "off", "0")


def parse_duration(text: str) -> float | None:
    """Seconds in `text`, or None for "never"/"off"/"0" (no limit).

    Raises ValueError with the accepted forms when `text` is not a duration.
    """
    cleaned = text.strip().lower().replace(" ", "")
    if cleaned in NEVER:
        return None
    pos, total = 0, 0.0
    for match in _PART.finditer(cleaned):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(cleaned) or pos == 0:
        raise ValueError(
            f"{text!r} is not a duration; write it like \"90s\", \"30m\", \"1h30m\" or \"never\""
        )
    return total


def format_duration(seconds: float | None) -> str:
    """A short human form: 42s, 5m03s, 2h10m, 3d4h; "-" for None."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600}h"

"""llmd.service as installed: the shipped unit with ExecStart pointing at this llmd."""

from __future__ import annotations

from pathlib import Path

from llmd.daemon.service.layout import shipped_text


def systemd_word(word: str) -> str:
    """`word` as one word of a unit's command line: quoted if it has spaces, with `%` and `\\` escaped."""
    escaped = word.replace("\\", "\\\\").replace("%", "%%").replace('"', '\\"')
    needs_quotes = any(c.isspace() for c in word) or '"' in word or "'" in word
    return f'"{escaped}"' if needs_quotes else escaped


def render_unit(llmd: Path, readme: Path | None) -> str:
    """The shipped llmd.service with ExecStart running `llmd` and Documentation naming `readme`.

    The shipped unit names /opt/llmd (the README's venv); the installed one names the llmd that
    ran `llmd install`. Without a README to point at, the Documentation= line is left out rather
    than naming a file that does not exist.
    """
    lines = []
    for line in shipped_text("llmd.service").splitlines():
        if line.startswith("ExecStart="):
            _, arguments = line.removeprefix("ExecStart=").split(maxsplit=1)
            line = f"ExecStart={systemd_word(str(llmd))} {arguments}"
        elif line.startswith("Documentation="):
            if readme is None:
                continue
            line = f"Documentation={readme.as_uri()}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def checkout_readme() -> Path | None:
    """The README of the source checkout llmd runs from (an editable install), if any.

    A wheel installs only the package, so there is no README on disk to point at.
    """
    checkout = Path(__file__).resolve().parents[2]
    readme = checkout / "README.md"
    return readme if readme.is_file() and (checkout / "pyproject.toml").is_file() else None

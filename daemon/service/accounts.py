"""The llmd user and group, made by systemd-sysusers from the shipped sysusers.d snippet."""

from __future__ import annotations

from pathlib import Path

from llmd.daemon.service.layout import SYSUSERS_SNIPPET, Target
from llmd.daemon.service.tools import run_tool, tool_lines


def _entries(path: Path) -> dict[str, list[str]]:
    """/etc/passwd or /etc/group as {name: its fields}; empty if the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    return {fields[0]: fields for fields in (line.split(":") for line in text.splitlines()) if len(fields) >= 3}


def accounts_in_place(target: Target, snippet: str) -> bool:
    """Whether the target's /etc/passwd and /etc/group already have what `snippet` declares.

    systemd-sysusers would change nothing then, but it still writes scratch files beside
    /etc/group for every `m` line, which changes /etc's mtime: skipping it keeps a second
    install from touching anything.
    """
    users = _entries(target.path(Path("/etc/passwd")))
    groups = _entries(target.path(Path("/etc/group")))
    for line in snippet.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        kind, name = fields[0], fields[1]
        if kind == "u" and (name not in users or name not in groups):
            return False
        if kind == "g" and name not in groups:
            return False
        if kind == "m":
            group = groups.get(fields[2])
            if group is None or name not in (group[3] if len(group) > 3 else "").split(","):
                return False
    return True


def create_accounts(target: Target) -> list[str]:
    """Run systemd-sysusers on the installed snippet; returns what it reported."""
    result = run_tool(["systemd-sysusers", *target.root_option(), SYSUSERS_SNIPPET.name])
    return tool_lines(result)


def remove_account(target: Target, user: str) -> list[str]:
    """Delete `user` and its group (userdel leaves the group where USERGROUPS_ENAB is off)."""
    said: list[str] = []
    if user in _entries(target.path(Path("/etc/passwd"))):
        run_tool(["userdel", *target.root_option(), user])
        said.append(f"removed user {user}")
    else:
        said.append(f"user {user}: not there")
    if user in _entries(target.path(Path("/etc/group"))):
        run_tool(["groupdel", *target.root_option(), user])
        said.append(f"removed group {user}")
    return said

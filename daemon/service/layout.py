"""Where the service's files go, and the target they go into: the running system or a root."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

UNIT_NAME = "llmd.service"
# Absolute paths as the target sees them.
UNIT = Path("/etc/systemd/system") / UNIT_NAME
UNIT_DROPINS = Path("/etc/systemd/system") / f"{UNIT_NAME}.d"
# `systemctl enable` makes this link from the unit's [Install] WantedBy=multi-user.target.
WANTS_LINK = Path("/etc/systemd/system/multi-user.target.wants") / UNIT_NAME
SYSUSERS_SNIPPET = Path("/usr/lib/sysusers.d/llmd.conf")
TMPFILES_SNIPPET = Path("/usr/lib/tmpfiles.d/llmd.conf")
CONFIG = Path("/etc/llmd/llmd.toml")
SERVICE_USER = "llmd"


def shipped_text(name: str) -> str:
    """One of the files in this package's `units/` folder (llmd.service, llmd.toml, ...)."""
    return (files("llmd.daemon.service") / "units" / name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Target:
    """The system being set up: the running one (`root` None) or a tree at `root`."""

    root: Path | None = None

    @property
    def live(self) -> bool:
        """True for the running system, where systemctl also reloads, starts and stops."""
        return self.root is None

    def path(self, absolute: Path) -> Path:
        """`absolute` (as the target sees it) as a path on this machine."""
        return absolute if self.root is None else self.root / absolute.relative_to("/")

    def root_option(self) -> list[str]:
        """`--root=DIR` for systemd-sysusers, systemd-tmpfiles, systemctl and userdel, or nothing."""
        return [] if self.root is None else [f"--root={self.root}"]

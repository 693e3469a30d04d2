"""The pid ledger: which engines this daemon started, kept on disk so a restart after a crash
(or a SIGKILL) can find and stop engines the previous run left behind, before it reuses
their ports or GPUs."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import psutil

from llmd.daemon.util.atomic_write import write_json_atomic
from llmd.daemon.util.redact import mask_argv
from llmd.daemon.util.state_file import expect, expect_number, read_state
from llmd.daemon.engines.supervisor import OWNER_ENV, EngineProcess

log = logging.getLogger(__name__)

LEFTOVER_GRACE_SECONDS = 5.0


class PidLedger:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, dict[str, Any]] = {}

    def add(self, engine: EngineProcess) -> None:
        try:
            created = psutil.Process(engine.pid).create_time()
        except psutil.NoSuchProcess:
            return
        self._entries[engine.name] = {
            "pid": engine.pid,
            "create_time": created,
            "argv": mask_argv(engine.argv),  # for a person reading the file: the secrets stay out
            "port": engine.port,
            "started_at": engine.started_at,
        }
        self._write()

    def remove(self, name: str) -> None:
        if self._entries.pop(name, None) is not None:
            self._write()

    def _write(self) -> None:
        write_json_atomic(self.path, self._entries, indent=1)

    def reap_leftovers(self, owner: str) -> list[str]:
        """Stop every engine a previous run left: those in the ledger (still the same process,
        by start time) and any process tagged with this daemon's owner tag (workers whose
        leader already died). Returns what was stopped, for the log."""
        victims: dict[int, psutil.Process] = {}
        for name, entry in self._read().items():
            try:
                proc = psutil.Process(entry["pid"])
                if abs(proc.create_time() - entry["create_time"]) < 0.01:
                    victims[proc.pid] = proc
            except (psutil.NoSuchProcess, KeyError, TypeError):
                continue
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and proc.environ().get(OWNER_ENV) == owner:
                    victims[proc.pid] = proc
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        stopped = []
        for proc in victims.values():
            try:
                stopped.append(f"pid {proc.pid} ({' '.join(proc.cmdline()[:3])})")
                _signal_group_or_process(proc.pid, signal.SIGTERM)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        _, alive = psutil.wait_procs(list(victims.values()), timeout=LEFTOVER_GRACE_SECONDS)
        for proc in alive:
            _signal_group_or_process(proc.pid, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=LEFTOVER_GRACE_SECONDS)
        self._entries = {}
        self._write()
        return stopped

    def _read(self) -> dict[str, dict[str, Any]]:
        return read_state(self.path, _parse_ledger) or {}


def _parse_ledger(data: Any) -> dict[str, dict[str, Any]]:
    """The ledger's entries, each checked: a wrong pid could make llmd signal a stranger."""
    for name, entry in expect(data, dict, "the ledger").items():
        expect(entry, dict, f"entry {name!r}")
        expect_number(entry["pid"], f"{name}.pid", minimum=1, integer=True)
        expect_number(entry["create_time"], f"{name}.create_time")
        if "argv" in entry and not all(isinstance(arg, str) for arg in expect(entry["argv"], list, f"{name}.argv")):
            raise ValueError(f"{name}.argv holds something other than strings")
        if "port" in entry:
            expect_number(entry["port"], f"{name}.port", minimum=1, integer=True)
    return data


def _signal_group_or_process(pid: int, sig: int) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass

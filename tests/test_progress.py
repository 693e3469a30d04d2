"""Load progress: what the daemon reports while an engine loads, and how llmctl shows it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from llmd.daemon.cli.output import Progress
from llmd.daemon.config import DaemonConfig
from llmd.daemon.manager.core import Manager
from llmd.daemon.manager.state import Instance, State
from llmd.daemon.models.profiles import Profile, ProfileSet


class _Loading:
    """Stands in for a loading engine's process: its log, and how often it was read."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.reads = 0

    def log_tail(self, lines: int = 20) -> list[str]:
        self.reads += 1
        return self.log[-lines:]


class _Driver:
    name = "fake"
    default_command = ["fake"]

    def load_progress(self, line: str) -> str | None:
        return line.removeprefix("PROGRESS ") if line.startswith("PROGRESS ") else None


def test_a_progress_event_reads_the_engine_log_once(tmp_path: Path) -> None:
    config = DaemonConfig.model_validate({"server": {"state_dir": str(tmp_path)}})
    manager = Manager(config, {"fake": _Driver()}, ProfileSet())  # type: ignore[dict-item]
    profile = Profile.model_validate({"engine": "fake", "model": {"path": str(tmp_path / "m.gguf")}})
    profile.name = "m"
    engine = _Loading(["PROGRESS loading weights 45%", "some other line"])
    inst = Instance(profile=profile, state=State.STARTING, engine=engine, progress="waiting for fake")  # type: ignore[arg-type]

    assert manager.load_report(inst) == ("waiting for fake: loading weights 45%", "some other line")
    assert engine.reads == 1

    inst.state, inst.progress = State.READY, ""
    assert manager.load_report(inst) == ("", "some other line")


def test_without_a_terminal_progress_is_plain_lines_at_most_every_so_often(capsys: pytest.CaptureFixture[str]) -> None:
    every_time = Progress()
    every_time("one")
    every_time("two")
    every_time.clear()
    every_time.keep()
    assert capsys.readouterr().err == "one\ntwo\n"  # nothing to erase or end in a log

    throttled = Progress(every=60)
    throttled("first")
    throttled("too soon")
    assert capsys.readouterr().err == "first\n"


def test_on_a_terminal_progress_rewrites_one_line_cut_to_its_width(capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr("shutil.get_terminal_size", lambda *args: os.terminal_size((12, 24)))
    progress = Progress(every=60)  # a terminal shows every message: the line is rewritten anyway
    progress("loading weights 45%")
    progress("ready")
    progress.clear()
    assert capsys.readouterr().err == "\r\x1b[2Kloading wei\r\x1b[2Kready\r\x1b[2K"
    progress("failing")
    progress.keep()
    assert capsys.readouterr().err == "\r\x1b[2Kfailing\n"

"""Logs that don't fill the disk: engine logs and the daemon's own log rotate at a size cap,
without losing a line, and `llmctl logs` (with -f too) reads on across a rotation."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from conftest import BIN, tiny_profile, wait_until
from llmd.daemon.util.rotating_log import LogFollower, LogLimits, RotatingLog, rotated
from support import daemon_with_server_settings

# 2 KiB: a few llama-server requests fill it.
CAP_MIB = 0.002
CAP = LogLimits.from_mib(CAP_MIB, 2).max_bytes


def test_a_rotating_log_keeps_whole_lines_under_its_cap(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    log = RotatingLog(path, LogLimits(100, 2))
    for i in range(60):
        line = f"line {i} {'x' * (i % 40)}\n".encode()
        log.write(line)
    log.write(b"y" * 250)  # longer than a file: cut where it must be
    log.close()
    files = [rotated(path, 2), rotated(path, 1), path]
    assert not rotated(path, 3).exists()
    assert all(0 < f.stat().st_size <= 100 for f in files)
    assert all(f.read_bytes().endswith((b"\n", b"y")) for f in files)
    assert path.read_bytes() == b"y" * 50


def test_a_follower_reads_on_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    log = RotatingLog(path, LogLimits(100, 1))
    log.write(b"seen before\n")
    follower = LogFollower(path, path.stat().st_size)
    got = expected = b""
    for i in range(100):
        line = f"line {i}\n".encode()
        log.write(line)
        expected += line
        got += follower.read_new() + follower.read_new()  # a poll or two between rotations
    assert got == expected


def test_a_follower_waits_for_a_log_that_does_not_exist_yet(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    follower = LogFollower(path)
    assert follower.read_new() == b""
    path.write_bytes(b"first\n")
    assert follower.read_new() == b"first\n"


def _chat(daemon) -> None:  # type: ignore[no-untyped-def]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(daemon.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


@pytest.mark.engine
def test_engine_and_daemon_logs_rotate_and_llmctl_follows(make_daemon, tiny_gguf: Path) -> None:
    daemon = daemon_with_server_settings(make_daemon, f"log_max_mib = {CAP_MIB}\nlog_keep = 2\n", {"tiny": tiny_profile(tiny_gguf)})
    daemon.llmctl("load", "tiny")
    engine_log = daemon.state_dir / "logs" / "tiny.log"
    follow = subprocess.Popen(
        [str(BIN / "llmctl"), "--socket", str(daemon.socket), "logs", "-f", "-n", "1", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert follow.stdout is not None
    output = follow.stdout.fileno()
    os.set_blocking(output, False)
    followed = b""

    def read_followed() -> bytes:
        nonlocal followed
        try:
            followed += os.read(output, 1 << 20)
        except BlockingIOError:
            pass
        return followed

    try:
        wait_until(lambda: read_followed().endswith(b"\n"), timeout=20, what="llmctl logs -f to show the last line")
        rotations = 0
        for request in range(1, 13):
            before = rotated(engine_log, 1).stat().st_ino if rotated(engine_log, 1).exists() else None
            _chat(daemon)
            # Each request's last line reaches the follower before the next request: no file is skipped.
            wait_until(lambda: read_followed().count(b"stop processing") >= request, timeout=20,
                       what=f"request {request}'s log lines to be followed")
            after = rotated(engine_log, 1).stat().st_ino if rotated(engine_log, 1).exists() else None
            rotations += after != before
    finally:
        follow.terminate()
        follow.wait(timeout=10)
    assert rotations >= 3
    assert followed.count(b"stop processing") == 12
    files = [engine_log, rotated(engine_log, 1), rotated(engine_log, 2)]
    assert all(0 < f.stat().st_size <= CAP for f in files) and not rotated(engine_log, 3).exists()
    # The engine logged on without a pause: it still answers, and `logs -n` reads across the rotation.
    _chat(daemon)
    lines = daemon.llmctl("logs", "-n", "40", "tiny").stdout.splitlines()
    assert len(lines) == 40 and any("stop processing" in line for line in lines[-5:])

    daemon_log = daemon.state_dir / "llmd.log"
    assert daemon.process is not None
    for reloads in range(1, 30):  # each reload logs a line; signals sent at once would make one reload
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(lambda: daemon.log().count("reloaded 1 profiles") >= reloads, what=f"reload {reloads}")
        if rotated(daemon_log, 1).exists():
            break
    assert rotated(daemon_log, 1).exists()
    assert daemon_log.stat().st_size <= CAP and rotated(daemon_log, 1).stat().st_size <= CAP
    assert "reloaded" in rotated(daemon_log, 1).read_text() + daemon_log.read_text()

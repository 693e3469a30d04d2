"""Logs that don't fill the disk: engine logs and the daemon's own log rotate at a size cap,
without losing a line, and `llmctl logs` (with -f too) reads on across a rotation."""

from __future__ import annotations

from pathlib import Path

from llmd.daemon.util.rotating_log import LogFollower, LogLimits, RotatingLog, rotated


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

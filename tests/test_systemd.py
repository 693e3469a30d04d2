"""systemd integration: the notify protocol against a real daemon, and the unit files."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, wait_until

REPO = Path(__file__).resolve().parent.parent


def test_ready_watchdog_and_stopping_reach_notify_socket(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.setblocking(False)
    from llmd.daemon.engines.supervisor import free_port

    port = free_port()
    (tmp_path / "llmd.toml").write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nsocket = "{tmp_path}/llmd.sock"\n'
        f'state_dir = "{tmp_path}/state"\nprofile_dirs = ["{tmp_path}/profiles"]\n'
    )
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    daemon = subprocess.Popen([str(BIN / "llmd"), "serve", "--config", str(tmp_path / "llmd.toml")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    received: list[str] = []

    def drain() -> list[str]:
        try:
            while True:
                received.extend(listener.recv(4096).decode().split("\n"))
        except BlockingIOError:
            return received

    try:
        wait_until(lambda: "READY=1" in drain(), timeout=20, what="READY=1")
        assert any(m.startswith("STATUS=serving 0 profiles") for m in received)
        wait_until(lambda: drain().count("WATCHDOG=1") >= 3, timeout=30, what="watchdog pings")
        # Under systemd, `llmctl shutdown` leaves the stopping to systemd.
        refused = subprocess.run([str(BIN / "llmctl"), "--socket", str(tmp_path / "llmd.sock"), "shutdown"],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "systemctl stop llmd" in refused.stderr, refused
        assert daemon.poll() is None and "STOPPING=1" not in drain()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
        drain()
        assert "STOPPING=1" in received
    finally:
        if daemon.poll() is None:
            daemon.kill()
        listener.close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists; point it at this checkout's llmd.
    unit = (REPO / "systemd" / "llmd.service").read_text().replace("/opt/llmd/bin/llmd", str(BIN / "llmd"))
    (tmp_path / "llmd.service").write_text(unit)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "llmd.service")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "KillMode=mixed" in unit


def test_service_config_is_valid() -> None:
    from llmd.daemon.config import load_config

    config = load_config(REPO / "systemd" / "llmd.toml")
    assert config.server.socket == Path("/run/llmd/llmd.sock")
    assert config.server.state_dir == Path("/var/lib/llmd")


def test_unit_is_locked_down_and_still_reaches_nvidia_devices() -> None:
    """`systemd-analyze security` rates the unit 3.0 or lower (lower is safer), and engines may
    still open the NVIDIA character devices under its device policy."""
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(REPO / "systemd" / "llmd.service")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    score = re.search(r"Overall exposure level for llmd\.service: ([0-9.]+)", result.stdout)
    assert score is not None, result.stdout[-2000:]
    assert float(score.group(1)) <= 3.0, result.stdout
    unit = (REPO / "systemd" / "llmd.service").read_text()
    assert "DevicePolicy=closed" in unit
    allowed = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("DeviceAllow=")]
    assert "char-nvidia* rw" in allowed and "/dev/nvidia-uvm rw" in allowed and "/dev/nvidiactl rw" in allowed
    assert "LimitNOFILE=" in unit

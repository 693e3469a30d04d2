"""`llmctl shutdown` against a real daemon and llama-server: it stops a daemon the user runs as
SIGTERM does, and leaves one that systemd runs to `systemctl stop`."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import engine_processes, tiny_profile, wait_until
from llmd.daemon.cli.shutdown import process_running
from llmd.daemon.util.sdnotify import started_by_systemd
from llmd.daemon.util.shutdown import Shutdown
from support import daemon_with_server_settings

# Long enough for the stream below on a busy machine, where llama-server's threads compete for
# the cores and generation slows down many times over.
SHUTDOWN_GRACE_S = 150


def _engine_pid(daemon, name: str) -> int:  # type: ignore[no-untyped-def]
    return next(row["pid"] for row in daemon.ps() if row["model"] == name)


def _gone(pid: int) -> bool:
    """Ended: no such process, or one that ended and waits for its parent to reap it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.engine
def test_shutdown_finishes_the_stream_stops_the_engine_and_exits_0(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_with_server_settings(make_daemon, f"shutdown_grace = {SHUTDOWN_GRACE_S}\n",
                                         {"tiny": tiny_profile(tiny_gguf, ctx=4096)})
    daemon.llmctl("load", "tiny")
    engine_pid = _engine_pid(daemon, "tiny")
    assert psutil.pid_exists(engine_pid)

    results: list[tuple[int, bool] | Exception] = []
    started = threading.Event()  # set at the stream's first line

    def stream() -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1500,
                "stream": True, "ignore_eos": True}
        done = False
        try:
            with httpx.stream("POST", daemon.url + "/v1/chat/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    started.set()
                    time.sleep(0.001)  # a slow reader: the reply is still going when the shutdown begins
                    done = done or line == "data: [DONE]"
            results.append((response.status_code, done))
        except Exception as exc:  # kept for the assertion's message
            results.append(exc)

    streaming = threading.Thread(target=stream)
    streaming.start()
    assert started.wait(timeout=20)
    result = daemon.llmctl("shutdown", timeout=SHUTDOWN_GRACE_S + 60)
    streaming.join(60)

    assert results == [(200, True)]  # the reply in flight ran to its end
    assert f"llmd stopped (pid {daemon.process.pid})" in result.stdout
    assert "finishing in-flight requests" in result.stderr
    assert daemon.process.wait(timeout=30) == 0
    wait_until(lambda: _gone(engine_pid), timeout=30, what=f"engine pid {engine_pid} to be gone")
    assert engine_processes(daemon.state_dir) == []
    assert not daemon.socket.exists()
    assert "llmctl shutdown: finishing in-flight requests" in daemon.log()


@pytest.mark.engine
def test_a_daemon_under_systemd_refuses_and_stays_up(make_daemon, tiny_gguf: Path,  # type: ignore[no-untyped-def]
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")  # what systemd sets for a unit
    monkeypatch.delenv("SYSTEMD_EXEC_PID", raising=False)  # the test's own, if it runs inside a unit
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf)})
    monkeypatch.delenv("INVOCATION_ID")
    daemon.llmctl("load", "tiny")

    refused = daemon.llmctl("shutdown", check=False)
    assert refused.returncode == 1, refused
    assert "systemctl stop llmd" in refused.stderr and "$INVOCATION_ID" in refused.stderr
    # Still serving, engine included.
    assert daemon.process.poll() is None
    assert daemon.state("tiny") == "ready"
    assert daemon.stop() == 0


def test_the_daemon_knows_systemd_by_its_variables() -> None:
    assert started_by_systemd({}) is None
    assert started_by_systemd({"INVOCATION_ID": "abc"}) == "INVOCATION_ID"
    assert started_by_systemd({"NOTIFY_SOCKET": "/run/systemd/notify", "INVOCATION_ID": "abc"}) == "NOTIFY_SOCKET"
    assert started_by_systemd({"NOTIFY_SOCKET": ""}) is None
    # systemd started this very process, or a process above it (a terminal run as a user service).
    assert started_by_systemd({"INVOCATION_ID": "abc", "SYSTEMD_EXEC_PID": str(os.getpid())}) == "INVOCATION_ID"
    assert started_by_systemd({"INVOCATION_ID": "abc", "SYSTEMD_EXEC_PID": "1"}) is None
    assert Shutdown(lambda who: None, None, 1.0).refusal() is None
    assert "systemctl stop llmd" in (Shutdown(lambda who: None, "NOTIFY_SOCKET", 1.0).refusal() or "")


def test_a_zombie_counts_as_ended() -> None:
    assert process_running(os.getpid())
    child = psutil.Popen(["true"])
    wait_until(lambda: child.status() == psutil.STATUS_ZOMBIE, timeout=10, what="the child to end")
    assert not process_running(child.pid)  # ended, not yet reaped
    child.wait()
    assert not process_running(child.pid)

"""Chaos with real engines: crashes, hangs, daemon kills, graceful stops, out-of-memory."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import engine_processes, tiny_profile, wait_until
from support import daemon_with_server_settings

pytestmark = pytest.mark.engine


def _chat(daemon, model: str = "tiny", **extra) -> httpx.Response:  # type: ignore[no-untyped-def]
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    return httpx.post(daemon.url + "/v1/chat/completions", json=body, timeout=60)


def _engine_pid(daemon, model: str = "tiny") -> int:  # type: ignore[no-untyped-def]
    return next(row["pid"] for row in daemon.ps() if row["model"] == model)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_engine_killed_mid_stream_then_restarts(make_daemon, tiny_gguf: Path) -> None:
    # A context long enough that the reply is still being generated when the client, slowed by
    # a busy machine, has read its 20th line (512 tokens take llama-server a fifth of a second).
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf, ctx=16384)})
    daemon.llmctl("load", "tiny")
    pid = _engine_pid(daemon)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000,
            "stream": True, "ignore_eos": True}
    lines = []
    with httpx.stream("POST", daemon.url + "/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            lines.append(line)
            if len(lines) == 20:
                os.kill(pid, signal.SIGKILL)
    # The stream ended (no hang) with an error event the client can see.
    assert any("broke off the stream" in line for line in lines), lines[-5:]
    wait_until(lambda: _engine_pid(daemon) not in (None, pid), timeout=15, what="automatic restart")
    wait_until(lambda: daemon.state("tiny") == "ready", timeout=15, what="restarted engine to be ready")
    assert _chat(daemon).status_code == 200
    assert "exited unexpectedly with code -9" in daemon.log()
    assert "restarting tiny in 1s" in daemon.log()


def test_hung_engine_is_detected_within_ten_seconds(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf)})
    daemon.llmctl("load", "tiny")
    pid = _engine_pid(daemon)
    os.kill(pid, signal.SIGSTOP)
    began = time.monotonic()
    wait_until(lambda: f"(pid {pid}) is hung: it is stopped" in daemon.log(), timeout=15, what="hang detection")
    assert time.monotonic() - began < 10
    wait_until(lambda: _gone(pid), timeout=10, what="the hung engine to be killed")
    wait_until(lambda: daemon.state("tiny") == "ready", timeout=15, what="restart after the hang")
    assert _chat(daemon).status_code == 200


def test_sigkilled_daemon_leaves_no_engine_and_the_next_start_works(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf)})
    daemon.llmctl("load", "tiny")
    pid = _engine_pid(daemon)
    daemon.stop(signal.SIGKILL)
    # PR_SET_PDEATHSIG takes the engine down with the daemon.
    wait_until(lambda: not engine_processes(daemon.state_dir), timeout=30, what="engine to die with the daemon")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    daemon.start()  # same port and socket: both reusable
    assert _chat(daemon).status_code == 200


def test_next_start_stops_engines_a_killed_daemon_left(make_daemon, tiny_gguf: Path, tmp_path: Path) -> None:
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf)})
    daemon.llmctl("load", "tiny")
    engine = psutil.Process(_engine_pid(daemon))
    # A grandchild the engine forked survives PDEATHSIG (as vLLM's workers would); fake one that
    # carries the engine's environment, the way a real fork does.
    env = {**os.environ, "LLMD_OWNER": str(daemon.state_dir), "LLMD_MODEL": "tiny"}
    leftover = psutil.Popen(["sleep", "600"], env=env, start_new_session=True)
    daemon.stop(signal.SIGKILL)
    wait_until(lambda: not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE, what="engine exit")
    assert leftover.is_running()
    daemon.start()
    wait_until(lambda: leftover.poll() is not None, timeout=10, what="leftover to be stopped at startup")
    assert "stopped an engine left by a previous run" in daemon.log()


def test_sigterm_lets_in_flight_streams_finish(make_daemon, tiny_gguf: Path) -> None:
    # Two slots, so both streams flow at once (with one, the second waits for the first's end).
    # A shutdown_grace long enough for both streams on a busy machine, where the engine and this
    # test's readers compete for the cores and the 3,000 tokens take many times longer.
    profile = tiny_profile(tiny_gguf, ctx=4096).replace("ctx = 4096", "ctx = 4096\nparallel = 2")
    daemon = daemon_with_server_settings(make_daemon, "shutdown_grace = 150\n", {"tiny": profile})
    daemon.llmctl("load", "tiny")
    results: list[tuple[int, bool]] = []
    started = threading.Semaphore(0)  # released once by each stream, at its first line

    def stream() -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3000,
                "stream": True, "ignore_eos": True}
        done = first = False
        with httpx.stream("POST", daemon.url + "/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not first:
                    first = True
                    started.release()
                time.sleep(0.001)
                done = done or line == "data: [DONE]"
        results.append((response.status_code, done))

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for thread in threads:
        thread.start()
    for _ in threads:  # both streams are flowing before the signal
        assert started.acquire(timeout=60)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(180)
    assert results == [(200, True), (200, True)]
    assert daemon.process.wait(timeout=30) == 0
    assert engine_processes(daemon.state_dir) == []


def test_out_of_memory_load_is_replanned_with_less_context(make_daemon, tiny_gguf: Path, llama_server_bin: Path,
                                                           tmp_path: Path) -> None:
    # An engine that runs out of memory above 1024 context cells, as a real one would on a small card.
    wrapper = tmp_path / "oom-llama-server"
    wrapper.write_text(
        "#!/bin/sh\n"
        'ctx=0; prev=""\n'
        'for a in "$@"; do [ "$prev" = "--ctx-size" ] && ctx=$a; prev=$a; done\n'
        'if [ "$ctx" -gt 1024 ]; then echo "ggml_backend_alloc: failed to allocate buffer: out of memory"; exit 1; fi\n'
        f'exec "{llama_server_bin}" "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf, ctx=4096)}, start=False)
    config = daemon.root / "llmd.toml"
    config.write_text(config.read_text().replace(str(llama_server_bin), str(wrapper)))
    daemon.start()
    assert _chat(daemon).status_code == 200
    row = daemon.ps()[0]
    assert row["argv"][row["argv"].index("--ctx-size") + 1] == "1024"
    assert "ran out of memory with ctx 4096; planning again with ctx 2048" in daemon.log()
    assert "ctx lowered to 1024" in row["placement"]


def test_autostart_profiles_come_back_after_a_restart(make_daemon, tiny_gguf: Path) -> None:
    profile = tiny_profile(tiny_gguf).replace('[policy]\n', '[policy]\nautostart = true\n')
    daemon = make_daemon({"tiny": profile})
    wait_until(lambda: daemon.state("tiny") == "ready", timeout=20, what="autostart")
    daemon.stop(signal.SIGKILL)
    daemon.start()
    wait_until(lambda: daemon.state("tiny") == "ready", timeout=20, what="autostart after a crash")

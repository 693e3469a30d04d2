"""Engine processes die with the process that started them (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

from conftest import wait_until

# Starts `sleep` as an engine, with ctypes unable to load a library from then on: setting up
# the child must only call prctl, which the parent looked up when it imported the supervisor.
_SPAWNER = textwrap.dedent("""\
    import ctypes
    import sys
    import time
    from pathlib import Path

    from llmd.daemon.engines.supervisor import spawn_engine
    from llmd.drivers.base import LaunchSpec

    def no_library(*args, **kwargs):
        raise AssertionError("a library was loaded between fork and exec")

    ctypes.CDLL = no_library
    engine = spawn_engine("sleeper", LaunchSpec(argv=["sleep", "120"], env={}), 0, Path(sys.argv[1]), owner=sys.argv[1])
    print(engine.pid, flush=True)
    time.sleep(120)
""")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_an_engine_dies_with_its_parent(tmp_path: Path) -> None:
    spawner = subprocess.Popen([sys.executable, "-c", _SPAWNER, str(tmp_path / "sleeper.log")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert spawner.stdout is not None
        line = spawner.stdout.readline()
        assert line.strip().isdigit(), spawner.stderr.read() if spawner.stderr else line
        engine_pid = int(line)
        assert not _gone(engine_pid)
        os.kill(spawner.pid, signal.SIGKILL)
        spawner.wait(timeout=10)
        wait_until(lambda: _gone(engine_pid), timeout=30, what="the engine to die with its parent")
    finally:
        if spawner.poll() is None:
            spawner.kill()
        spawner.wait(timeout=10)


# Starts an engine that forks a worker into its own process group, as vLLM does.
_FORKING_SPAWNER = textwrap.dedent("""\
    import sys
    import time
    from pathlib import Path

    from llmd.daemon.engines.supervisor import spawn_engine
    from llmd.drivers.base import LaunchSpec

    spec = LaunchSpec(argv=["sh", "-c", "sleep 300 & wait"], env={})
    engine = spawn_engine("forker", spec, 0, Path(sys.argv[1]), owner=sys.argv[1])
    print(engine.pid, flush=True)
    time.sleep(120)
""")


def test_what_an_engine_started_dies_with_llmd_too(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG reaches the engine only; the reaper stops the rest of its group."""
    spawner = subprocess.Popen([sys.executable, "-c", _FORKING_SPAWNER, str(tmp_path / "forker.log")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert spawner.stdout is not None
        line = spawner.stdout.readline()
        assert line.strip().isdigit(), spawner.stderr.read() if spawner.stderr else line
        engine = psutil.Process(int(line))
        worker = wait_until(lambda: engine.children(), timeout=10, what="the engine's worker")[0]
        assert os.getpgid(worker.pid) == engine.pid
        os.kill(spawner.pid, signal.SIGKILL)
        spawner.wait(timeout=10)
        wait_until(lambda: _gone(engine.pid) and _gone(worker.pid), timeout=10,
                   what="the engine and its worker to die with llmd")
    finally:
        if spawner.poll() is None:
            spawner.kill()
        spawner.wait(timeout=10)

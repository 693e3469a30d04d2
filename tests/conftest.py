"""Shared fixtures: tiny models, the llama-server binary, and a real `llmd serve` process."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from llmd.daemon.config import default_engines_dir
from llmd.daemon.engines.supervisor import OWNER_ENV, free_port
from llmd.daemon.models.tinymodel import write_tiny_gguf

BIN = Path(sys.executable).parent
# CI sets this so that a missing engine fails the run instead of skipping the real-engine tests.
REQUIRE_ENGINES = os.environ.get("LLMD_REQUIRE_ENGINES") == "1"

# The test-only driver package (tests/thirdparty_driver), installed by `scripts/test` with
# `pip install --target` here rather than into the venv, so that it never shows up in the
# user's llmd (profile comments, hints, doctor). Its .dist-info on sys.path is what makes its
# entry point visible; PYTHONPATH carries it to the daemons and engines the tests start.
TEST_DRIVER_DIR = Path(__file__).resolve().parent.parent / "build" / "test-driver"


def _register_test_driver() -> None:
    if not TEST_DRIVER_DIR.is_dir() or str(TEST_DRIVER_DIR) in sys.path:
        return
    sys.path.append(str(TEST_DRIVER_DIR))
    paths = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    if str(TEST_DRIVER_DIR) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([*paths, str(TEST_DRIVER_DIR)])


_register_test_driver()


def _llama_server() -> Path | None:
    override = os.environ.get("LLMD_LLAMA_SERVER")
    if override:
        return Path(override)
    from llmd.daemon.engines.provision import find_installed_binary

    return find_installed_binary(default_engines_dir(), "llama-cpp")


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    path = _llama_server()
    if path is None or not path.exists():
        message = "llama-server is not installed: run `llmctl engines install llama-cpp` (or set LLMD_LLAMA_SERVER)"
        if REQUIRE_ENGINES:
            pytest.fail(message)
        pytest.skip(message)
    return path


def engine_command(engine: str) -> list[str]:
    """The argv prefix of `engine` as installed by `llmctl engines install ENGINE`.

    Skips the calling test when it is not installed, or fails it when CI requires every engine.
    """
    if engine == "llama-cpp":
        path = _llama_server()
        command = [str(path)] if path is not None and path.exists() else None
    else:
        from llmd.daemon.engines.provision import find_installed_command

        command = find_installed_command(default_engines_dir(), engine)
    if command is None:
        message = f"{engine} is not installed: run `llmctl engines install {engine}`"
        if REQUIRE_ENGINES:
            pytest.fail(message)
        pytest.skip(message)
    return command


@pytest.fixture(scope="session")
def fastllm_command() -> list[str]:
    return engine_command("fastllm")


@pytest.fixture(scope="session")
def vllm_command() -> list[str]:
    return engine_command("vllm")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weightless HF model directory for vLLM (start it with `--load-format dummy`)."""
    from llmd.daemon.models.tinymodel import write_tiny_hf_dir

    return write_tiny_hf_dir(tmp_path_factory.mktemp("models") / "tiny-hf")


@pytest.fixture
def slow_llama(tmp_path: Path, llama_server_bin: Path) -> Path:
    """llama-server behind a wrapper that first sleeps $SLOW_START seconds (set per profile): a model that loads slowly."""
    wrapper = tmp_path / "slow-llama-server"
    wrapper.write_text(f'#!/bin/sh\nsleep "${{SLOW_START:-0}}"\nexec "{llama_server_bin}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return wrapper


def write_client_config(root: Path, socket_path: Path, profiles: Path) -> Path:
    """An llmd.toml for llmctl alone: where the socket is, and the profile dir it reads when no
    daemon answers there."""
    config = root / "llmd.toml"
    config.write_text(textwrap.dedent(f"""\
        [server]
        socket = "{socket_path}"
        state_dir = "{root / 'state'}"
        profile_dirs = ["{profiles}"]
        """))
    return config


def engine_processes(state_dir: Path) -> list[psutil.Process]:
    """Live engine processes (and their children) started by the daemon owning `state_dir`."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(OWNER_ENV) == str(state_dir):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_until(condition, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class RunningDaemon:
    """A real `llmd serve` subprocess with its own config, profiles and state in a temp dir."""

    root: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.root / "daemon.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def socket(self) -> Path:
        return self.root / "llmd.sock"

    @property
    def profiles_dir(self) -> Path:
        return self.root / "profiles"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def add_profile(self, name: str, body: str) -> Path:
        path = self.profiles_dir / f"{name}.toml"
        path.write_text(textwrap.dedent(body))
        return path

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(BIN / "llmd"), "serve", "--config", str(self.root / "llmd.toml")],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        wait_until(self._listening, timeout=20, what=f"llmd to listen (log: {self.log_path})")

    def _listening(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"llmd exited with {self.process.returncode}:\n{self.log_path.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                pass
            probe = socket.socket(socket.AF_UNIX)
            probe.connect(str(self.socket))
            probe.close()
            return True
        except OSError:
            return False

    def llmctl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "llmctl"), "--socket", str(self.socket), *args],
            capture_output=True, text=True, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"llmctl {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def ps(self) -> list[dict]:
        import json

        return json.loads(self.llmctl("ps", "--json").stdout)

    def state(self, model: str) -> str | None:
        return next((row["state"] for row in self.ps() if row["model"] == model), None)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def make_daemon(tmp_path: Path, llama_server_bin: Path) -> Iterator:
    """Build a daemon: `make_daemon(profiles={"name": "toml"}, extra_config="...")`, started."""
    started: list[RunningDaemon] = []

    def factory(profiles: dict[str, str] | None = None, extra_config: str = "", start: bool = True) -> RunningDaemon:
        root = tmp_path / f"llmd{len(started)}"
        root.mkdir()
        daemon = RunningDaemon(root=root, port=free_port())
        daemon.profiles_dir.mkdir()
        (root / "llmd.toml").write_text(
            textwrap.dedent(
                f"""\
                [server]
                listen = "127.0.0.1:{daemon.port}"
                socket = "{daemon.socket}"
                state_dir = "{daemon.state_dir}"
                profile_dirs = ["{daemon.profiles_dir}"]
                stop_grace = 5
                [engines.llama-cpp]
                command = ["{llama_server_bin}"]
                """
            )
            + textwrap.dedent(extra_config)
        )
        for name, body in (profiles or {}).items():
            daemon.add_profile(name, body)
        started.append(daemon)
        if start:
            daemon.start()
        return daemon

    yield factory
    for daemon in started:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.stop(signal.SIGKILL)
        kill_and_wait(engine_processes(daemon.state_dir))


def kill_and_wait(processes: list[psutil.Process], timeout: float = 30) -> None:
    """SIGKILL `processes` and wait until they are gone, so the next test starts on a quiet machine."""
    for proc in processes:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    wait_until(lambda: not any(map(_alive, processes)), timeout=timeout, what=f"{processes} to exit after SIGKILL")


def _alive(proc: psutil.Process) -> bool:
    """Whether the process still runs (a zombie only waits for its parent to reap it)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def tiny_profile(
    model: Path,
    *,
    ttl: str = "30m",
    aliases: list[str] | None = None,
    ctx: int = 512,
    engine: str = "llama-cpp",
    extra_args: list[str] | None = None,
) -> str:
    return f"""\
        engine = "{engine}"
        aliases = {aliases or []!r}
        [model]
        path = "{model}"
        [launch]
        ctx = {ctx}
        extra_args = {extra_args or []!r}
        [policy]
        ttl = "{ttl}"
        """.replace("'", '"')

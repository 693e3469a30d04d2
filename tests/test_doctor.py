"""`llmctl doctor` on this machine, for real: engines, GPUs, permissions, ports and smoke inferences."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import BIN, kill_and_wait
from llmd.daemon.config import default_engines_dir
from llmd.daemon.diagnostics.doctor import SMOKE_MODEL, User, check_socket, may
from llmd.daemon.placement.inventory import CpuOnlyInventory, open_inventory
from llmd.daemon.engines.provision import list_installed
from llmd.daemon.engines.supervisor import OWNER_ENV, free_port


def _config(root: Path, extra: str = "", port: int | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "llmd.toml"
    path.write_text(textwrap.dedent(f"""\
        [server]
        listen = "127.0.0.1:{port or free_port()}"
        socket = "{root / 'llmd.sock'}"
        state_dir = "{root / 'state'}"
        profile_dirs = ["{root / 'profiles'}"]
        """) + textwrap.dedent(extra))
    return path


def _doctor(config: Path, *args: str, tmpdir: Path | None = None, timeout: float = 300) -> tuple[int, dict]:
    env = {**os.environ, **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
    env.pop("LLMD_SOCKET", None)
    done = subprocess.run([str(BIN / "llmctl"), "--config", str(config), "doctor", "--json", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, check=False)
    return done.returncode, json.loads(done.stdout)


def _check(report: dict, name: str) -> dict:
    return next(c for c in report["checks"] if c["check"] == name)


def _smoke_leftovers(scratch: Path) -> list[psutil.Process]:
    """Smoke engines (and their children) of doctor runs whose temp dir was `scratch`: each is
    owned by the run's own directory in it, so runs of other tests are left alone."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
            if env.get("LLMD_MODEL") == SMOKE_MODEL and env.get(OWNER_ENV, "").startswith(f"{scratch}/"):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture
def scratch() -> Iterator[Path]:
    """The temp dir (TMPDIR) for doctor's smoke runs. Every engine they start is gone at
    teardown, even after a failure or a timeout that killed llmctl before it could stop it."""
    # Short: vLLM puts unix sockets (at most 107 bytes of path) in the temp dir doctor gives it.
    path = Path(tempfile.mkdtemp(prefix="dr-"))
    try:
        yield path
    finally:
        kill_and_wait(_smoke_leftovers(path))
        shutil.rmtree(path, ignore_errors=True)


def test_engines_gpus_and_a_clean_host(tmp_path: Path) -> None:
    code, report = _doctor(_config(tmp_path / "llmd"), "--no-smoke")
    assert code == 0 and report["ok"] and report["counts"]["fail"] == 0, report
    installed = {e.engine: e for e in reversed(list_installed(default_engines_dir()))}
    for engine in ("llama-cpp", "fastllm", "vllm"):
        check = _check(report, f"engine {engine}")
        if engine in installed:
            assert check["status"] == "ok", check
            assert f"{installed[engine].version} ({installed[engine].flavour} build)" in check["detail"]
        else:
            assert check["status"] == "warn" and f"llmctl engines install {engine}" in check["fix"]
    gpus = _check(report, "gpus")
    if isinstance(open_inventory(None), CpuOnlyInventory):
        assert gpus["status"] == "warn" and "no NVIDIA driver / CPU-only" in gpus["detail"], gpus
    else:
        assert gpus["status"] == "ok" and "driver" in gpus["detail"]
    assert _check(report, "state dir")["status"] == "warn"  # not created yet: llmd creates it
    assert _check(report, "socket")["status"] == "warn" and "not running" in _check(report, "socket")["detail"]
    assert not any(c["check"].startswith("smoke") for c in report["checks"])


def test_simulated_gpus_are_called_simulated(tmp_path: Path) -> None:
    snapshot = tmp_path / "gpus.json"
    snapshot.write_text(json.dumps({"gpus": [{"name": "RTX 4090", "total_mib": 24564, "free_mib": 24000}]}))
    code, report = _doctor(_config(tmp_path / "llmd", f'[gpus]\nsimulate = "{snapshot}"\n'), "--no-smoke")
    gpus = _check(report, "gpus")
    assert gpus["status"] == "warn" and "simulated" in gpus["detail"] and "RTX 4090" in gpus["detail"]
    assert "remove [gpus] simulate" in gpus["fix"] and code == 0


def test_each_engine_is_looked_up_once_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from llmd.daemon.cli import doctor as cli_doctor

    from llmd.daemon.diagnostics import doctor
    from llmd.daemon.cli.main import main
    from llmd.daemon.diagnostics.doctor import CheckResult

    looked_up: list[str] = []

    def resolve(config, driver):  # type: ignore[no-untyped-def]
        looked_up.append(driver.name)
        return ["/bin/true"]

    async def smoke(config, found, progress):  # type: ignore[no-untyped-def]
        return CheckResult(f"smoke {found.driver.name}", "ok", f"ran {found.command}")

    monkeypatch.setattr(doctor, "resolve_command", resolve)
    monkeypatch.setattr(cli_doctor, "smoke_engine", smoke)  # the engine check and the smoke test both need it
    result = CliRunner().invoke(main, ["--config", str(_config(tmp_path / "llmd")), "doctor", "--json"])
    report = json.loads(result.stdout)
    assert sorted(looked_up) == sorted(set(looked_up)) and "llama-cpp" in looked_up, looked_up
    assert _check(report, "smoke llama-cpp")["detail"] == "ran ['/bin/true']"


def test_state_dir_the_daemon_user_cannot_write(tmp_path: Path) -> None:
    config = _config(tmp_path / "llmd")
    state = tmp_path / "llmd" / "state"
    state.mkdir(mode=0o700)
    os.chmod(state, 0o700)
    if os.getuid() == 0:
        # Root may write anywhere; the daemon's own user (here: nobody) may not.
        code, report = _doctor(config, "--no-smoke", "--user", "nobody")
        check = _check(report, "state dir")
        assert check["status"] == "fail" and "nobody" in check["detail"] and "mode 0700" in check["detail"], check
        assert check["fix"] == f"sudo chown nobody {state} && sudo chmod u+rwx {state}"
    else:
        os.chmod(state, 0o500)
        code, report = _doctor(config, "--no-smoke")
        check = _check(report, "state dir")
        assert check["status"] == "fail" and check["fix"] == f"chmod u+rwx {state}"
    assert code == 1 and not report["ok"]

    os.chmod(state, 0o777)
    code, report = _doctor(config, "--no-smoke")
    check = _check(report, "state dir")
    assert check["status"] == "warn" and "writable by every user" in check["detail"] and check["fix"] == f"chmod o-w {state}"


def test_unknown_user_and_engine_are_usage_errors(tmp_path: Path) -> None:
    config = _config(tmp_path / "llmd")
    for args, words in ((["--user", "no-such-user-xyz"], "no user named"), (["--engine", "nope"], "known: ")):
        done = subprocess.run([str(BIN / "llmctl"), "--config", str(config), "doctor", "--no-smoke", *args],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2 and words in done.stderr, done.stderr


def test_a_port_held_by_another_program_fails(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run([str(BIN / "llmctl"), "--config", str(_config(tmp_path / "llmd", port=port)), "doctor", "--no-smoke"],
                              capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    line = next(line for line in done.stdout.splitlines() if f"port 127.0.0.1:{port}" in line)
    assert line.startswith("FAIL") and "already in use" in line and f"pid {os.getpid()}" in line, done.stdout
    assert "fix: stop what holds it, or choose another port for [server] listen" in done.stdout
    assert "1 failed" in done.stdout


def test_a_running_llmd_holds_its_port_and_answers(make_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon = make_daemon()
    code, report = _doctor(daemon.root / "llmd.toml", "--no-smoke")
    port = _check(report, f"port 127.0.0.1:{daemon.port}")
    assert port["status"] == "ok" and "held by a running llmd" in port["detail"], port
    sock = _check(report, "socket")
    assert sock["status"] == "ok" and "llmd answers" in sock["detail"] and "mode 0660" in sock["detail"], sock
    assert _check(report, "state dir")["status"] == "ok" and code == 0


def test_socket_access_is_judged_for_the_llmctl_user(tmp_path: Path) -> None:
    path = tmp_path / "llmd.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        os.chmod(path, 0o660)
        st = path.stat()
        outsider = User("nobody", 65534, frozenset({65534}))
        assert not may(st, outsider, 6)
        assert may(st, User("member", 65534, frozenset({65534, st.st_gid})), 6)
        check = check_socket(path, outsider)
    assert check.status == "fail" and "usermod -aG" in (check.fix or "") and "nobody" in check.fix


@pytest.mark.engine
def test_smoke_llama_cpp_and_fastllm(tmp_path: Path, scratch: Path, llama_server_bin: Path,
                                     fastllm_command: list[str]) -> None:
    config = _config(tmp_path / "llmd", f"""\
        [engines.llama-cpp]
        command = ["{llama_server_bin}"]
        [engines.fastllm]
        command = {json.dumps(fastllm_command)}
        """)
    code, report = _doctor(config, "--engine", "llama-cpp", "--engine", "fastllm", tmpdir=scratch)
    for engine in ("llama-cpp", "fastllm"):
        check = _check(report, f"smoke {engine}")
        assert check["status"] == "ok" and "chat answered" in check["detail"], check
    assert [c["check"] for c in report["checks"] if c["check"].startswith("engine")] == ["engine llama-cpp", "engine fastllm"]
    assert code == 0
    assert list(scratch.iterdir()) == [] and _smoke_leftovers(scratch) == []


@pytest.mark.engine
def test_a_broken_engine_fails_its_smoke_test(tmp_path: Path, scratch: Path) -> None:
    # An "engine" that exits at once: the smoke test reports it with the engine's last words.
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\necho 'error: cannot open the model' >&2\nexit 3\n")
    fake.chmod(0o755)
    config = _config(tmp_path / "llmd", f'[engines.llama-cpp]\ncommand = ["{fake}"]\n')
    code, report = _doctor(config, "--engine", "llama-cpp", tmpdir=scratch)
    check = _check(report, "smoke llama-cpp")
    assert check["status"] == "fail" and "exited with code 3" in check["detail"], check
    assert "cannot open the model" in check["detail"] and code == 1


@pytest.mark.engine
@pytest.mark.slow
def test_smoke_vllm(tmp_path: Path, scratch: Path, vllm_command: list[str]) -> None:
    config = _config(tmp_path / "llmd", f"[engines.vllm]\ncommand = {json.dumps(vllm_command)}\n")
    env = {**os.environ, "TMPDIR": str(scratch)}
    # vLLM's CPU start takes 20-70 s on two cores, and several times that on a busy machine.
    done = subprocess.run([str(BIN / "llmctl"), "--config", str(config), "doctor", "--engine", "vllm"],
                          capture_output=True, text=True, timeout=900, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert any(line.startswith("ok    smoke vllm: ready in") for line in done.stdout.splitlines()), done.stdout
    # Progress while vLLM starts: elapsed seconds and the engine's last log line.
    assert "smoke vllm: " in done.stderr and "s)  | " in done.stderr
    assert list(scratch.iterdir()) == [] and _smoke_leftovers(scratch) == []


def test_an_address_not_of_this_host_is_told_apart_from_a_held_port(tmp_path: Path) -> None:
    config = _config(tmp_path / "llmd")
    # 192.0.2.0/24 is reserved for documentation: no host has it.
    config.write_text(config.read_text().replace('listen = "127.0.0.1:', 'listen = "192.0.2.7:'))
    done = subprocess.run([str(BIN / "llmctl"), "--config", str(config), "doctor", "--no-smoke"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    line = next(line for line in done.stdout.splitlines() if "port 192.0.2.7:" in line)
    assert line.startswith("FAIL") and "[server] listen: cannot bind" in line and "already in use" not in line, done.stdout
    assert "fix: set [server] listen in llmd.toml to an address of this host" in done.stdout

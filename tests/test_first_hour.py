"""The first hour with llmd, through real daemons: llmctl finds the daemon wherever it was
started from and whatever llmd.toml says, `status` and `--version` say who is running and where,
`logs -n` means what it says, `load` says what it did, an unknown model is worded one way
everywhere, the proxy's port points at the dashboard, `llmd init` writes files to start from,
and an open listener without API keys is warned about."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import BIN, RunningDaemon, free_port, tiny_profile, wait_until

API_KEY = "first-hour-key-0123"


def run_cli(program: str, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`llmctl` or `llmd` with the environment of a user who set no LLMD_* variables."""
    environment = {key: value for key, value in os.environ.items() if key not in ("LLMD_SOCKET", "LLMD_CONFIG")}
    return subprocess.run([str(BIN / program), *args], capture_output=True, text=True, timeout=timeout,
                          env={**environment, **(env or {})})


def write_config(root: Path, port: int, server_extra: str = "", extra: str = "", socket_line: bool = True) -> Path:
    config = root / "llmd.toml"
    socket_setting = f'socket = "{root / "llmd.sock"}"\n' if socket_line else ""
    config.write_text(
        "[server]\n"
        f'listen = "127.0.0.1:{port}"\n'
        + socket_setting
        + f'state_dir = "{root / "state"}"\n'
        f'profile_dirs = ["{root / "profiles"}"]\n'
        + textwrap.dedent(server_extra)
        + textwrap.dedent(extra)
    )
    return config


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[RunningDaemon]:
    """A real daemon with API keys and two profiles, neither of which needs to run: log tests
    read log files written here, not an engine's."""
    root = tmp_path_factory.mktemp("first-hour")
    running = RunningDaemon(root=root, port=free_port())
    running.profiles_dir.mkdir()
    running.add_profile("tiny", tiny_profile(tiny_gguf, aliases=["tiny-chat"]))
    running.add_profile("other", tiny_profile(tiny_gguf))
    write_config(root, running.port, f'api_keys = ["{API_KEY}"]\n')
    running.start()
    yield running
    running.stop()


# ----- finding the daemon -----


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def test_llmctl_finds_a_daemon_started_without_xdg_runtime_dir_despite_a_broken_config(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    """A daemon started from nohup or cron (no $XDG_RUNTIME_DIR) listens in /tmp/llmd-UID; an
    SSH login's llmctl (another $XDG_RUNTIME_DIR) with a broken llmd.toml still reaches it."""
    uid = os.getuid()
    fallback = Path(f"/tmp/llmd-{uid}/llmd.sock")
    if _answers(fallback) or _answers(Path(f"/run/user/{uid}/llmd/llmd.sock")):
        pytest.skip("a daemon of this user already listens in a well-known place")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "tiny.toml").write_text(textwrap.dedent(tiny_profile(tiny_gguf)))
    port = free_port()
    config = write_config(tmp_path, port, socket_line=False)
    env = {key: value for key, value in os.environ.items() if key != "XDG_RUNTIME_DIR"}
    log = (tmp_path / "daemon.log").open("wb")
    process = subprocess.Popen([str(BIN / "llmd"), "serve", "--config", str(config)], stdout=log,
                               stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: process.poll() is None and _answers(fallback), timeout=30, what="llmd on its /tmp socket")
        broken = tmp_path / "broken.toml"
        broken.write_text("[server\nsocket = \n")
        odd_runtime = tmp_path / "runtime"
        odd_runtime.mkdir()
        user = {"XDG_RUNTIME_DIR": str(odd_runtime), "LLMD_CONFIG": str(broken)}

        ps = run_cli("llmctl", "ps", env=user)
        assert ps.returncode == 0, ps.stderr
        assert ps.stdout.startswith("MODEL")
        warning = ps.stderr.strip().splitlines()
        assert len(warning) == 1 and warning[0].startswith(f"llmctl: warning: {broken}: not valid TOML")

        status = run_cli("llmctl", "status", env=user)
        assert status.returncode == 0, status.stderr
        assert f"management:  {fallback}" in status.stdout

        # Without a broken config, from the odd runtime dir, too; and nothing is warned about.
        plain = run_cli("llmctl", "ps", env={"XDG_RUNTIME_DIR": str(odd_runtime), "XDG_CONFIG_HOME": str(tmp_path / "none")})
        assert plain.returncode == 0 and plain.stderr == ""
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    gone = run_cli("llmctl", "ps", env={"XDG_RUNTIME_DIR": str(tmp_path / "runtime"), "XDG_CONFIG_HOME": str(tmp_path / "none")})
    assert gone.returncode == 3
    assert "also looked at" in gone.stderr and str(fallback) in gone.stderr


def test_global_options_work_after_the_subcommand(daemon: RunningDaemon) -> None:
    config = str(daemon.root / "llmd.toml")
    for args in (["ps", "--socket", str(daemon.socket)], ["ps", "--config", config], ["ls", "--json", "--config", config]):
        result = run_cli("llmctl", *args)
        assert result.returncode == 0, (args, result.stderr)
    # A lazily imported command, and a subcommand of it.
    listing = run_cli("llmctl", "profile", "ls", "--json", "--config", config)
    assert listing.returncode == 0, listing.stderr
    assert sorted(row["name"] for row in json.loads(listing.stdout)) == ["other", "tiny"]
    # The one given after the subcommand wins.
    wrong = run_cli("llmctl", "--socket", str(daemon.root / "absent.sock"), "ps", "--socket", str(daemon.socket))
    assert wrong.returncode == 0, wrong.stderr


# ----- status and --version -----


def test_status_says_who_runs_and_where_to_reach_it(daemon: RunningDaemon) -> None:
    report = json.loads(daemon.llmctl("status", "--json").stdout)
    assert report["pid"] == daemon.process.pid  # type: ignore[union-attr]
    assert report["version"] and report["uptime_s"] >= 0
    assert report["openai_url"] == f"http://127.0.0.1:{daemon.port}/v1" and report["api_key_required"] is True
    assert report["socket"] == str(daemon.socket)
    assert report["config"] == str(daemon.root / "llmd.toml")
    assert report["profile_dirs"] == [str(daemon.profiles_dir)] and report["profiles"] == 2
    assert report["dashboard"]["url"] is None and "management_listen" in report["dashboard"]["how"]
    assert report["models"] == []

    text = daemon.llmctl("status").stdout
    for line in (f"llmd:        {report['version']}, pid {report['pid']}, up ",
                 f"OpenAI API:  http://127.0.0.1:{daemon.port}/v1; API key required",
                 f"management:  {daemon.socket}", "dashboard:   the dashboard is served on the management socket only",
                 f"profiles:    {daemon.profiles_dir} (2 profiles)", "models:      none running"):
        assert line in text, text


def _fake_engines(root: Path) -> Path:
    for engine, version in (("llama-cpp", "1.2.3"), ("vllm", "0.9.0")):
        install = root / engine / f"{version}-cpu"
        (install / "bin").mkdir(parents=True)
        binary = install / "bin" / "run"
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
        (install / "manifest.json").write_text(json.dumps(
            {"engine": engine, "version": version, "flavour": "cpu", "binary": "bin/run"}))
    return root


@pytest.mark.parametrize("program", ["llmctl", "llmd"])
def test_version_lists_llmd_and_each_installed_engine(program: str, tmp_path: Path) -> None:
    from llmd.daemon.version import llmd_version

    engines = _fake_engines(tmp_path / "engines")
    result = run_cli(program, "--version", env={"LLMD_ENGINES_DIR": str(engines), "XDG_CONFIG_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"llmd {llmd_version()}", f"engines in {engines}:", "  llama-cpp 1.2.3 (cpu)", "  vllm 0.9.0 (cpu)",
    ]
    # The config's engines_dir wins, read without validating the rest of the file.
    config = tmp_path / "llmd.toml"
    config.write_text(f'[server]\nengines_dir = "{tmp_path / "none"}"\nno_such_key = 1\n')
    empty = run_cli(program, "--version", env={"LLMD_CONFIG": str(config)})
    assert empty.stdout.splitlines()[1] == f"no engines installed in {tmp_path / 'none'} (`llmctl engines install llama-cpp`)"


# ----- logs -----


def _write_log(daemon: RunningDaemon, name: str, lines: int) -> Path:
    log = daemon.state_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(f"line {i}\n" for i in range(lines)))
    return log


class _Reader:
    """Collects a process's output lines in the background, so waits can have deadlines."""

    def __init__(self, stream) -> None:  # type: ignore[no-untyped-def]
        self.lines: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            self.lines.append(line.rstrip("\n"))


def test_logs_n_means_what_it_says(daemon: RunningDaemon) -> None:
    log = _write_log(daemon, "tiny", 6000)
    assert daemon.llmctl("logs", "tiny", "-n", "0").stdout == ""
    tail = daemon.llmctl("logs", "tiny", "-n", "5000").stdout.splitlines()
    assert len(tail) == 5000 and tail[0] == "line 1000" and tail[-1] == "line 5999"
    assert daemon.llmctl("logs", "tiny-chat", "-n", "2").stdout == "line 5998\nline 5999\n"

    follow = subprocess.Popen([str(BIN / "llmctl"), "--socket", str(daemon.socket), "logs", "tiny", "-f", "-n", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = _Reader(follow.stdout)

        def a_mark_shows() -> bool:
            with log.open("a") as fh:
                fh.write("mark\n")
            return "mark" in out.lines

        # The follower starts from the end: what came before must not show. Marks are written
        # until one shows, so the line below is written once it follows, however slow its start.
        wait_until(a_mark_shows, timeout=30, interval=0.5, what="the follower to start")
        with log.open("a") as fh:
            fh.write("a new line\n")
        wait_until(lambda: "a new line" in out.lines, timeout=20, what="the new line")
        assert set(out.lines) == {"mark", "a new line"} and out.lines[-1] == "a new line", out.lines[:5]
    finally:
        follow.terminate()
        follow.wait(timeout=10)


def test_logs_of_a_model_that_never_ran_say_so(daemon: RunningDaemon) -> None:
    result = daemon.llmctl("logs", "other", check=False)
    assert result.returncode == 1
    assert "'other' has not run yet" in result.stderr and "llmctl load other" in result.stderr
    follow = subprocess.Popen([str(BIN / "llmctl"), "--socket", str(daemon.socket), "logs", "other", "-f"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        err = _Reader(follow.stderr)
        wait_until(lambda: err.lines, timeout=20, what="the note on stderr")
        assert err.lines == ["llmctl: other has not run yet; waiting for its engine log"]
    finally:
        follow.terminate()
        follow.wait(timeout=10)


# ----- one wording for an unknown model -----


def test_an_unknown_model_is_worded_the_same_everywhere_with_a_close_name(daemon: RunningDaemon) -> None:
    wording = ("model 'tiny-chatt' does not exist; did you mean 'tiny-chat'? "
               "`llmctl ls` or GET /v1/models lists the served models")
    proxy = httpx.post(daemon.url + "/v1/chat/completions", json={"model": "tiny-chatt", "messages": []},
                       headers={"Authorization": f"Bearer {API_KEY}"})
    assert proxy.status_code == 404 and proxy.json()["error"]["message"] == wording
    for command in (["load", "tiny-chatt"], ["plan", "tiny-chatt"], ["logs", "tiny-chatt"], ["unload", "tiny-chatt"]):
        result = daemon.llmctl(*command, check=False)
        assert result.returncode == 1 and result.stderr.strip() == f"llmctl: {wording}", command
    far = daemon.llmctl("load", "zzzz", check=False)
    assert far.stderr.strip() == "llmctl: model 'zzzz' does not exist; `llmctl ls` or GET /v1/models lists the served models"


# ----- the dashboard, asked for on the proxy's port -----


def test_the_proxy_port_says_where_the_dashboard_is_without_an_api_key(daemon: RunningDaemon) -> None:
    for path in ("/dashboard", "/dashboard/playground"):
        answer = httpx.get(daemon.url + path)
        assert answer.status_code == 404 and answer.headers["content-type"].startswith("text/html")
        assert "the dashboard is not served here" in answer.text
        assert f"ssh -L 8809:{daemon.socket}" in answer.text and "management_listen" in answer.text
    # Everything else on the port still wants the key.
    assert httpx.get(daemon.url + "/v1/models").status_code == 401


def test_dashboard_location_for_each_setup() -> None:
    from llmd.daemon.config import DaemonConfig
    from llmd.daemon.web.dashboard_where import dashboard_location

    off = dashboard_location(DaemonConfig.model_validate({"dashboard": {"enabled": False}}))
    assert off.url is None and "set [dashboard] enabled = true" in off.how
    tcp = DaemonConfig.model_validate({"server": {"management_listen": "0.0.0.0:8809", "management_token": "t" * 16}})
    assert dashboard_location(tcp).url == "http://127.0.0.1:8809/dashboard"
    assert dashboard_location(tcp, seen_as="gpu-box").url == "http://gpu-box:8809/dashboard"


# ----- load says what it did -----


@pytest.mark.engine
def test_load_says_what_it_did(make_daemon, tiny_gguf: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """On two simulated cards with room for one model each: already running, the idle model
    stopped to make room, and the one replaced."""
    from test_scheduling_e2e import _copies, _profile, _two_card_daemon

    models = _copies(tiny_gguf, tmp_path, ["a", "b", "c"])
    daemon = _two_card_daemon(make_daemon, tmp_path, {n: _profile(p, vram=1200) for n, p in models.items()})
    first = daemon.llmctl("load", "a").stdout.strip()
    assert re.fullmatch(r"a is ready in \d+\.\d\ds \(pid \d+, port \d+\)", first), first
    assert daemon.llmctl("load", "a").stdout.startswith("a was already running (pid ")
    daemon.llmctl("load", "b")
    evicting = daemon.llmctl("load", "c").stdout.strip()
    assert evicting.startswith("c is ready in ") and evicting.endswith("; stopped idle a to make room"), evicting
    replacing = daemon.llmctl("load", "a", "--replace", "b").stdout.strip()
    assert replacing.startswith("a is ready in ") and replacing.endswith("; replaced b"), replacing
    assert {row["model"]: row["state"] for row in daemon.ps()} == {"a": "ready", "b": "stopped", "c": "ready"}


# ----- placement hints -----


def test_a_placement_hint_is_given_only_when_it_would_fit(tmp_path: Path, tiny_gguf: Path) -> None:
    sim = tmp_path / "gpus.json"
    sim.write_text(json.dumps({"gpus": [{"name": "Sim", "total_mib": 2000, "free_mib": 2000}] * 2}))
    running = RunningDaemon(root=tmp_path, port=free_port())
    running.profiles_dir.mkdir()
    for name, vram in (("splits", 3000), ("huge", 5000)):
        running.add_profile(name, f'engine = "llama-cpp"\n[model]\npath = "{tiny_gguf}"\n[placement]\nvram_mib = {vram}\n')
    write_config(tmp_path, running.port, extra=f'[gpus]\nsimulate = "{sim}"\nmargin_mib = 0\n')
    running.start()
    try:
        splits = json.loads(running.llmctl("plan", "splits", "--json", check=False).stdout)
        assert not splits["fits"] and 'it would fit if the profile allowed tensor_parallel = "auto"' in splits["reason"]
        huge = json.loads(running.llmctl("plan", "huge", "--json", check=False).stdout)
        assert not huge["fits"] and "would fit" not in huge["reason"] and "tensor_parallel" not in huge["reason"]
    finally:
        running.stop()


# ----- llmd init -----


def test_llmd_init_writes_a_commented_config_and_a_user_unit_and_keeps_them(tmp_path: Path) -> None:
    from llmd.daemon.config import DaemonConfig, load_config

    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_STATE_HOME": str(tmp_path / "state"),
           "XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_DATA_HOME": str(tmp_path / "data")}
    first = run_cli("llmd", "init", env=env)
    assert first.returncode == 0, first.stderr
    config = tmp_path / "config" / "llmd" / "llmd.toml"
    unit = tmp_path / "config" / "systemd" / "user" / "llmd.service"
    assert f"config: {config} (written" in first.stdout and f"systemd user unit: {unit} (written)" in first.stdout
    assert "systemctl --user enable --now llmd" in first.stdout
    assert (tmp_path / "config" / "llmd" / "profiles").is_dir()

    text = config.read_text()
    # Every key is there, commented out, with its default; uncommented, they are the defaults.
    keys = re.findall(r"^# ([a-z_]+) = (.*)$", text, flags=re.M)
    for section in ("server", "gpus", "dashboard", "metrics"):
        model = type(getattr(DaemonConfig(), section))
        assert set(model.model_fields) <= {key for key, _ in keys}, section
    uncommented = re.sub(r"^# ([a-z_]+ = .*)$", r"\1", text, flags=re.M)
    uncommented = "\n".join(line for line in uncommented.splitlines() if "# unset by default" not in line)
    (tmp_path / "all.toml").write_text(uncommented)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        assert load_config(tmp_path / "all.toml") == DaemonConfig() == load_config(config)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    unit_text = unit.read_text()
    assert f"ExecStart={BIN / 'llmd'} serve --config {config}" in unit_text
    assert "WantedBy=default.target" in unit_text and "Type=notify" in unit_text

    config.write_text("# mine\n")
    unit.write_text("# mine too\n")
    again = run_cli("llmd", "init", env=env)
    assert again.returncode == 0, again.stderr
    assert "(exists, kept)" in again.stdout
    assert config.read_text() == "# mine\n" and unit.read_text() == "# mine too\n"


# ----- an open listener without keys -----


def test_a_listener_open_to_the_network_without_api_keys_is_warned_about(tmp_path: Path) -> None:
    for keyed in (False, True):
        root = tmp_path / ("keyed" if keyed else "open")
        root.mkdir()
        running = RunningDaemon(root=root, port=free_port())
        running.profiles_dir.mkdir()
        config = write_config(root, running.port, f'api_keys = ["{API_KEY}"]\n' if keyed else "")
        config.write_text(config.read_text().replace('listen = "127.0.0.1:', 'listen = "0.0.0.0:'))
        running.start()
        running.stop()
        warned = "without api_keys: anyone who can reach this address can use every model" in running.log()
        assert warned is not keyed, running.log()


def test_is_loopback_host() -> None:
    from llmd.daemon.util.loopback import is_loopback_host

    assert all(is_loopback_host(host) for host in ("127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback_host(host) for host in ("0.0.0.0", "::", "192.168.1.5", "gpu-box"))

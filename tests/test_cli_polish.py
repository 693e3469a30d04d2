"""llmctl for scripts and shells: --json on every listing, completion of model names in bash,
zsh and fish (from the daemon, or from the profile files when it is down or hung), and the
documented exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, tiny_profile, write_client_config

COMPLETION_REQUEST = {
    # shell: (mode, COMP_WORDS, COMP_CWORD) for completing `llmctl load ti`
    "bash": ("bash_complete", "llmctl load ti", "2"),
    "zsh": ("zsh_complete", "llmctl load ti", "2"),
    "fish": ("fish_complete", "llmctl load ti", "ti"),
}


def run_llmctl(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key not in ("LLMD_SOCKET", "LLMD_CONFIG")}
    return subprocess.run([str(BIN / "llmctl"), *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env={**environment, **(env or {})})


def complete(shell: str, env: dict[str, str], words: str | None = None) -> list[str]:
    """What the completion script would offer for `llmctl load ti` (or `words`) in `shell`."""
    mode, comp_words, cword = COMPLETION_REQUEST[shell]
    if words is not None:
        comp_words = words
        cword = words.split()[-1] if shell == "fish" else str(len(words.split()) - 1)
    result = run_llmctl(env={**env, "_LLMCTL_COMPLETE": mode, "COMP_WORDS": comp_words, "COMP_CWORD": cword})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    if shell == "zsh":  # triples of lines: type, value, help
        lines = out.splitlines()
        return [lines[i + 1] for i in range(0, len(lines), 3) if lines[i] == "plain"]
    return [line.split(",", 1)[1].split("\t")[0] for line in out.splitlines() if line.startswith("plain,")]


@pytest.fixture
def files_only(tmp_path: Path, tiny_gguf: Path) -> dict[str, str]:
    """Environment for llmctl with profiles on disk and no daemon behind the socket."""
    profiles = tmp_path / "disk-profiles"
    profiles.mkdir()
    (profiles / "tiny.toml").write_text(textwrap.dedent(tiny_profile(tiny_gguf, aliases=["tiny-alias"])))
    (profiles / "other.toml").write_text(textwrap.dedent(tiny_profile(tiny_gguf)))
    config = write_client_config(tmp_path, tmp_path / "absent.sock", profiles)
    return {"LLMD_CONFIG": str(config)}


@pytest.fixture
def hung_socket(tmp_path: Path) -> Iterator[Path]:
    """A unix socket that accepts connections and never answers, like a daemon stuck in a call."""
    path = tmp_path / "hung.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(8)
    yield path
    server.close()


# ----- completion -----


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_are_printed(shell: str) -> None:
    result = run_llmctl("completion", shell)
    assert result.returncode == 0, result.stderr
    assert "_LLMCTL_COMPLETE" in result.stdout
    assert {"bash": "complete -o nosort -F", "zsh": "#compdef llmctl", "fish": "complete --no-files --command llmctl"}[shell] in result.stdout
    assert run_llmctl("completion", "tcsh").returncode == 2


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_names_complete_from_the_profile_files_without_a_daemon(shell: str, files_only: dict[str, str]) -> None:
    assert complete(shell, files_only) == ["tiny", "tiny-alias"]
    assert complete(shell, files_only, "llmctl unload o") == ["other"]


def test_a_hung_daemon_does_not_hang_completion(files_only: dict[str, str], hung_socket: Path) -> None:
    started = time.monotonic()
    assert complete("bash", {**files_only, "LLMD_SOCKET": str(hung_socket)}) == ["tiny", "tiny-alias"]
    assert time.monotonic() - started < 5


@pytest.mark.engine
@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_names_complete_from_the_running_daemon(shell: str, make_daemon, tiny_gguf: Path, tmp_path: Path) -> None:
    daemon = make_daemon({"tiger": tiny_profile(tiny_gguf, aliases=["tiny-cat"]), "lion": tiny_profile(tiny_gguf)})
    # The config llmctl reads names no profile dir: the names can only come from the daemon.
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"LLMD_SOCKET": str(daemon.socket), "LLMD_CONFIG": str(write_client_config(tmp_path, daemon.socket, empty))}
    assert complete(shell, env) == ["tiger", "tiny-cat"]
    assert complete(shell, env, "llmctl plan l") == ["lion"]
    assert complete(shell, env, "llmctl load --replace ti") == ["tiger", "tiny-cat"]


# ----- --json -----


@pytest.mark.engine
def test_every_listing_has_json_with_raw_numbers(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf)})
    config = daemon.root / "llmd.toml"
    daemon.llmctl("load", "tiny")

    ps = json.loads(daemon.llmctl("ps", "--json").stdout)
    assert ps[0]["model"] == "tiny" and isinstance(ps[0]["uptime_s"], (int, float))
    human = daemon.llmctl("ps").stdout
    assert "UPTIME" in human and "tiny" in human

    profiles = json.loads(daemon.llmctl("ls", "--json").stdout)
    assert [(p["name"], p["valid"], p["ttl"]) for p in profiles] == [("tiny", True, "30m")]

    gpus = json.loads(daemon.llmctl("gpus", "--json").stdout)
    assert set(gpus) == {"note", "gpus"}

    plan = json.loads(daemon.llmctl("plan", "tiny", "--json").stdout)
    assert plan["model"] == "tiny" and plan["fits"] is True

    engines = json.loads(daemon.llmctl("--config", str(config), "engines", "--json").stdout)
    assert any(row["engine"] == "llama-cpp" for row in engines["available"])

    on_disk = json.loads(daemon.llmctl("--config", str(config), "profile", "ls", "--json").stdout)
    assert [(p["name"], p["valid"]) for p in on_disk] == [("tiny", True)]


def test_profile_ls_json_reports_invalid_files(files_only: dict[str, str]) -> None:
    profiles = Path(json.loads(run_llmctl("profile", "ls", "--json", env=files_only).stdout)[0]["source"]).parent
    (profiles / "broken.toml").write_text('engine = "llama-cpp"\n')
    rows = json.loads(run_llmctl("profile", "ls", "--json", env=files_only).stdout)
    broken = next(row for row in rows if row["name"] == "broken")
    assert broken["valid"] is False and "model: Field required" in broken["error"]


# ----- exit codes -----


def test_exit_3_when_the_daemon_is_not_reachable(files_only: dict[str, str], hung_socket: Path, tmp_path: Path) -> None:
    for command in (["ps"], ["ls", "--json"], ["gpus"], ["plan", "tiny"], ["load", "tiny"], ["unload", "--all"]):
        result = run_llmctl(*command, env=files_only)
        assert result.returncode == 3, (command, result.stderr)
        assert "cannot reach llmd on" in result.stderr


def test_exit_2_for_bad_usage(files_only: dict[str, str]) -> None:
    assert run_llmctl("no-such-command", env=files_only).returncode == 2
    assert run_llmctl("ps", "--no-such-option", env=files_only).returncode == 2
    bad_name = run_llmctl("load", "../etc", env=files_only)
    assert bad_name.returncode == 2 and "is not a valid model name" in bad_name.stderr
    assert run_llmctl("unload", env=files_only).returncode == 2  # neither NAME nor --all


@pytest.mark.parametrize("lines", ["-5", "10001"])
def test_logs_refuses_a_line_count_outside_the_limit(files_only: dict[str, str], lines: str) -> None:
    result = run_llmctl("logs", "tiny", "-n", lines, env=files_only)
    assert result.returncode == 2  # refused before the daemon is asked (there is none here: that would be 3)
    assert f"'-n' / '--lines': {lines} is not in the range 0<=x<=10000" in result.stderr


def test_the_logs_route_refuses_a_negative_line_count(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from llmd.daemon.web.api import build_api_app
    from llmd.daemon.config import DaemonConfig
    from llmd.daemon.manager.core import Manager
    from llmd.daemon.models.profiles import Profile, ProfileSet
    from llmd.drivers.registry import load_drivers

    profile = Profile.model_validate({"engine": "llama-cpp", "model": {"path": str(tmp_path / "m.gguf")}})
    profile.name = "tiny"
    profiles = ProfileSet()
    profiles.profiles["tiny"] = profile
    config = DaemonConfig.model_validate({"server": {"state_dir": str(tmp_path / "state")}})
    log = tmp_path / "state" / "logs" / "tiny.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i}\n" for i in range(5)))
    with TestClient(build_api_app(Manager(config, load_drivers(), profiles))) as client:
        refused = client.get("/v1/models/tiny/logs", params={"lines": "-5"})
        assert refused.status_code == 400
        assert refused.json()["error"] == "lines must be 0 or more (how many lines from the end of the log to send), not -5"
        tail = client.get("/v1/models/tiny/logs", params={"lines": "2"})
        assert tail.status_code == 200 and tail.text == "line 3\nline 4\n"


def test_engines_sees_the_simulated_gpus_the_daemon_would(tmp_path: Path) -> None:
    snapshot = tmp_path / "gpus.json"
    snapshot.write_text(json.dumps({"gpus": [{"name": "SimCard", "total_mib": 24000, "free_mib": 24000}] * 2}))
    config = write_client_config(tmp_path, tmp_path / "absent.sock", tmp_path)
    config.write_text(config.read_text() + f'[gpus]\nsimulate = "{snapshot}"\n')
    listing = json.loads(run_llmctl("--config", str(config), "engines", "--json").stdout)
    assert listing["host"] == {"gpus": 2, "note": f"simulated from {snapshot}"}
    assert [(a["engine"], a["flavours"]) for a in listing["available"]] == [
        ("llama-cpp", ["cpu", "cuda"]), ("fastllm", ["cpu", "cuda"]), ("vllm", ["cpu", "cuda"]),
    ]

    snapshot.write_text("{not json")
    broken = run_llmctl("--config", str(config), "engines")
    assert broken.returncode == 1 and f"{snapshot}: invalid JSON" in broken.stderr


@pytest.mark.engine
def test_exit_0_and_1_against_a_running_daemon(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf)})
    assert daemon.llmctl("ps", check=False).returncode == 0
    unknown = daemon.llmctl("load", "nothing-here", check=False)
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr
    assert daemon.llmctl("plan", "tiny", check=False).returncode == 0
    assert daemon.llmctl("unload", "tiny", check=False).returncode == 0


def test_a_socket_llmctl_may_not_open_says_to_join_its_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmd.daemon.cli.client import Daemon, DaemonUnreachable
    from llmd.daemon.cli.unix_http import UnixConnection

    def refuse(self: UnixConnection) -> None:
        # What connecting raises for a unix socket whose mode shuts this user out (root is never refused).
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(UnixConnection, "connect", refuse)
    daemon = Daemon(tmp_path / "llmd.sock")
    with pytest.raises(DaemonUnreachable, match="permission denied on .*join the socket's group"):
        daemon.query("GET", "/v1/ps")


def test_error_replies_of_either_shape_and_odd_bodies_give_a_message() -> None:
    from llmd.daemon.http.openai_errors import error_message

    assert error_message(404, b'{"error": "model \'x\' does not exist"}') == "model 'x' does not exist"
    assert error_message(401, b'{"error": {"message": "bad key", "type": "x"}}') == "bad key"
    assert error_message(500, b"[1, 2]") == "HTTP 500: [1, 2]"
    assert error_message(502, b"<html>bad gateway</html>") == "HTTP 502: <html>bad gateway</html>"
    assert error_message(503, b"") == "HTTP 503"

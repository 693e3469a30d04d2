"""llmd.toml: defaults, env, and errors that name the file, the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmd.daemon.config import DaemonConfig, config_path_from_env, load_config
from llmd.daemon.errors import ConfigError


def test_defaults_follow_xdg_without_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("LLMD_SOCKET", raising=False)
    config = DaemonConfig()
    assert config.server.listen == "127.0.0.1:8808"
    assert config.server.socket == tmp_path / "run" / "llmd" / "llmd.sock"
    assert config.server.state_dir == tmp_path / "state" / "llmd"
    assert config.server.profile_dirs == [tmp_path / "config" / "llmd" / "profiles"]


def test_service_config_from_issue_parses(tmp_path: Path) -> None:
    path = tmp_path / "llmd.toml"
    path.write_text(
        '[server]\nlisten = "127.0.0.1:8808"\nsocket = "/run/llmd/llmd.sock"\nstate_dir = "/var/lib/llmd"\n'
        'profile_dirs = ["/etc/llmd/profiles"]\n[engines.llama-cpp]\ncommand = ["llama-server"]\nenv = {}\n'
    )
    config = load_config(path)
    assert config.server.socket == Path("/run/llmd/llmd.sock")
    assert config.engine("llama-cpp").command == ["llama-server"]
    assert config.engine("vllm").command is None


def test_config_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMD_CONFIG", str(tmp_path / "x.toml"))
    assert config_path_from_env(None) == tmp_path / "x.toml"
    assert config_path_from_env(tmp_path / "y.toml") == tmp_path / "y.toml"


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    path = tmp_path / "llmd.toml"
    path.write_text('[server]\nstate_dir = "state"\nprofile_dirs = ["profiles"]\n')
    config = load_config(path)
    assert config.server.state_dir == tmp_path / "state"
    assert config.server.profile_dirs == [tmp_path / "profiles"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[server]\nlisten = "8808"\n', "server.listen: listen must be \"HOST:PORT\""),
        ('[server]\nlisten = "127.0.0.1:99999"\n', "server.listen"),
        ('[server]\nlistn = "127.0.0.1:1"\n', "server.listn: unknown key; did you mean `listen`?"),
        ('[engines.llama-cpp]\ncommand = []\n', "engines.llama-cpp.command: command must be a non-empty list"),
        ('[server]\nstop_grace = -1\n', "server.stop_grace"),
        ("[server\n", "invalid TOML"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "llmd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert expected in str(caught.value)


def test_missing_config_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")

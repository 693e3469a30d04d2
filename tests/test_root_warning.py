"""`llmd serve` and `llmctl engines install` say so, once, when run as root, and run all the same."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmd.daemon.cli.main import main as llmctl
from llmd.daemon.engines import provision_venv
from llmd.daemon.engines.provision import InstalledEngine
from llmd.daemon.service.root_warning import root_warning

ROOT_LINE = "is running as root"


def _as_user(monkeypatch: pytest.MonkeyPatch, uid: int) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: uid)


def test_the_warning_names_the_unprivileged_user_to_run_as(monkeypatch: pytest.MonkeyPatch) -> None:
    _as_user(monkeypatch, 0)
    warning = root_warning("llmd serve", "engines run")
    assert warning is not None and warning.startswith(f"llmd serve {ROOT_LINE}: engines run with every privilege")
    assert "`llmd` service user" in warning and "llmd init" in warning
    _as_user(monkeypatch, 1000)
    assert root_warning("llmd serve", "engines run") is None


@pytest.mark.parametrize("uid", [0, 1000])
def test_engines_install_warns_as_root_and_installs_anyway(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, uid: int) -> None:
    installed = InstalledEngine(engine="fastllm", version="1.9.0", flavour="cpu", path=tmp_path / "ftllm",
                                built_at="now", command_args=("server",))
    monkeypatch.setattr(provision_venv, "install_venv_engine", lambda *args, **kwargs: installed)
    _as_user(monkeypatch, uid)
    config = tmp_path / "llmd.toml"
    config.write_text(f'[server]\nengines_dir = "{tmp_path}"\n')
    result = CliRunner().invoke(llmctl, ["--config", str(config), "engines", "install", "fastllm"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{tmp_path / 'ftllm'} server"
    warnings = [line for line in result.stderr.splitlines() if ROOT_LINE in line]
    if uid == 0:
        assert warnings == [
            "llmctl: warning: llmctl engines install is running as root: pip and the build it runs execute the "
            "downloaded packages' code with every privilege. Run it as an unprivileged user instead, such as the "
            "`llmd` service user that `llmd install` creates (`sudo -u llmd ...`), or your own user (`llmd init`)."
        ]
    else:
        assert warnings == []


@pytest.mark.engine
def test_serve_logs_the_warning_once_when_root(make_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon = make_daemon({})
    lines = [line for line in daemon.log().splitlines() if ROOT_LINE in line]
    if os.geteuid() == 0:  # CI runs as root
        assert len(lines) == 1 and "llmd serve is running as root" in lines[0] and "WARNING" in lines[0]
        assert "`llmd` service user" in lines[0]
    else:
        assert lines == []

"""`llmctl engines install fastllm|vllm`: the venv machinery, without the network.

A stand-in recipe fills the venv the way pip would (a console script whose `#!` line names the
venv's python), so staging, relocation, the manifest, the cache and failure handling run for
real in a second or two. The real installs are exercised by the engine tests.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from llmd.daemon.engines import provision_venv
from llmd.daemon.engines.commands import resolve_command
from llmd.daemon.config import DaemonConfig, ServerConfig
from llmd.daemon.engines.provision import EngineBuildError, EngineInstallError, find_installed_command, list_installed
from llmd.daemon.engines.provision_venv import TORCH_CPU_INDEX, TorchIndexError, _Recipe, install_venv_engine
from llmd.drivers.fastllm import FastllmDriver


def _fake_recipe(fail: bool = False):  # type: ignore[no-untyped-def]
    def factory(version: str, cuda: bool) -> _Recipe:
        def populate(pip) -> list[str]:  # type: ignore[no-untyped-def]
            pip.begin("writing the engine script")
            if fail:
                pip.run([str(pip.python), "-c", "import sys; print('resolver exploded'); sys.exit(3)"], "installing")
            script = pip.venv / "bin" / "ftllm"
            script.write_text(f"#!{pip.venv}/bin/python\nimport sys\nprint('fake ftllm', *sys.argv[1:])\n")
            script.chmod(0o755)
            return ["fake"]

        return _Recipe(engine="fastllm", version=version, flavour="cuda" if cuda else "cpu",
                       binary="venv/bin/ftllm", command_args=("server",), populate=populate,
                       smoke_test=("ftllm", "server", "--help"))

    return factory


@pytest.fixture
def fake_fastllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(provision_venv._RECIPES, "fastllm", _fake_recipe())
    monkeypatch.setitem(provision_venv._STEPS, ("fastllm", False), 3)


def test_install_is_staged_relocated_and_cached(tmp_path: Path, fake_fastllm: None) -> None:
    messages: list[str] = []
    installed = install_venv_engine(tmp_path, "fastllm", version="9.9.9", progress=messages.append)
    root = tmp_path / "fastllm" / "9.9.9-cpu"
    assert installed.path == root / "venv" / "bin" / "ftllm"
    assert installed.command == [str(root / "venv" / "bin" / "ftllm"), "server"]
    assert any("[1/3] creating a virtual environment" in m for m in messages)
    assert messages[-1].startswith("installed fastllm 9.9.9-cpu in ")
    # Nothing of the staging directory is left, and the script runs from its final place.
    assert sorted(p.name for p in (tmp_path / "fastllm").iterdir()) == [".9.9.9-cpu.lock", "9.9.9-cpu"]
    run = subprocess.run(installed.command + ["--port", "1"], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "fake ftllm server --port 1"
    assert ".build-" not in (root / "venv" / "bin" / "ftllm").read_text()

    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["engine"] == "fastllm" and manifest["command_args"] == ["server"]
    assert "pip" in {name.lower() for name in manifest["packages"]}

    # Cached: no output at all the second time.
    assert install_venv_engine(tmp_path, "fastllm", version="9.9.9", progress=pytest.fail) == installed
    assert [(e.engine, e.version) for e in list_installed(tmp_path)] == [("fastllm", "9.9.9")]
    assert find_installed_command(tmp_path, "fastllm") == installed.command


def test_resolve_command_uses_the_installed_argv_prefix(tmp_path: Path, fake_fastllm: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    installed = install_venv_engine(tmp_path, "fastllm", version="9.9.9", progress=lambda m: None)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no `ftllm` on PATH
    config = DaemonConfig(server=ServerConfig(engines_dir=tmp_path))
    assert resolve_command(config, FastllmDriver()) == installed.command


def test_failed_install_leaves_nothing_and_keeps_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(provision_venv._RECIPES, "fastllm", _fake_recipe(fail=True))
    with pytest.raises(EngineBuildError, match="resolver exploded") as info:
        install_venv_engine(tmp_path, "fastllm", version="9.9.9", progress=lambda m: None)
    assert "full log:" in str(info.value)
    assert list_installed(tmp_path) == []
    names = sorted(p.name for p in (tmp_path / "fastllm").iterdir())
    assert names == [".9.9.9-cpu.install-failed.log", ".9.9.9-cpu.lock"]


def test_torch_missing_everywhere_names_pytorchs_index(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[list[str]] = []

    class Pip:
        label = "vllm 0.32.0-cpu"
        log_path = tmp_path / "log"

        def install(self, args: list[str], what: str) -> None:
            calls.append(args)
            raise EngineBuildError("ERROR: No matching distribution found for torch==2.13.0+cpu")

        def progress(self, message: str) -> None:
            pass

    monkeypatch.delenv(provision_venv.TORCH_INDEX_ENV, raising=False)
    with pytest.raises(TorchIndexError) as info:
        provision_venv._install_cpu_torch(Pip(), "2.13.0+cpu")  # type: ignore[arg-type]
    assert TORCH_CPU_INDEX in str(info.value) and provision_venv.TORCH_INDEX_ENV in str(info.value)
    assert calls == [["torch==2.13.0+cpu"],
                     ["--extra-index-url", TORCH_CPU_INDEX, "--timeout", "30", "--retries", "2", "torch==2.13.0+cpu"]]


def test_unknown_engine_and_bad_version(tmp_path: Path) -> None:
    with pytest.raises(EngineInstallError, match="unknown engine 'tgi'"):
        install_venv_engine(tmp_path, "tgi")
    with pytest.raises(EngineInstallError, match="invalid fastllm version"):
        install_venv_engine(tmp_path, "fastllm", version="../x")

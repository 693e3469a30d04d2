"""llmctl starts fast because it imports only what the command at hand needs: `--help`, shell
completion and `llmctl ps` leave the manager, the scheduler, the estimator, numpy, gguf, the
config's validation (pydantic) and httpx alone. Timings are too noisy to assert on a shared
machine; which modules a run imported is not (docs/cli.md, "Startup time")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path

import pytest
from conftest import RunningDaemon, free_port

# None of these, or anything under them, may be imported by the quick paths.
HEAVY = (
    "llmd.daemon.manager",
    "llmd.daemon.placement.scheduler",
    "llmd.daemon.placement.estimate",
    "numpy",
    "gguf",
    "pydantic",
    "httpx",
)

# Runs llmctl as its entry point does, then writes down what it imported.
PROBE = textwrap.dedent("""\
    import json, os, sys
    from llmd.daemon.cli.main import main
    try:
        main(sys.argv[1:], prog_name="llmctl")
    finally:
        with open(os.environ["MODULES_FILE"], "w") as fh:
            json.dump(sorted(sys.modules), fh)
    """)


def run_probe(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    modules_file = tmp_path / "modules.json"
    environment = {key: value for key, value in os.environ.items() if key not in ("LLMD_SOCKET", "LLMD_CONFIG")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60,
        env={**environment, "MODULES_FILE": str(modules_file), **(env or {})},
    )
    return result, json.loads(modules_file.read_text())


def heavy_imports(modules: list[str]) -> list[str]:
    return [name for name in modules if any(name == heavy or name.startswith(heavy + ".") for heavy in HEAVY)]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    """A real `llmd serve` with one profile, of a model it never needs to load."""
    root = tmp_path_factory.mktemp("llmd")
    running = RunningDaemon(root=root, port=free_port())
    running.profiles_dir.mkdir()
    running.add_profile("tiny", """\
        engine = "llama-cpp"
        [model]
        hf_repo = "example/tiny-GGUF"
        hf_file = "tiny.gguf"
        """)
    (root / "llmd.toml").write_text(textwrap.dedent(f"""\
        [server]
        listen = "127.0.0.1:{running.port}"
        socket = "{running.socket}"
        state_dir = "{running.state_dir}"
        profile_dirs = ["{running.profiles_dir}"]
        """))
    running.start()
    yield running
    running.stop()


@pytest.mark.parametrize("how", ["--socket", "--config"])
def test_ps_against_a_running_daemon_imports_nothing_heavy(daemon: RunningDaemon, tmp_path: Path, how: str) -> None:
    where = str(daemon.socket) if how == "--socket" else str(daemon.root / "llmd.toml")
    result, modules = run_probe(tmp_path, how, where, "ps")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("MODEL  ENGINE  STATE"), result.stdout
    assert heavy_imports(modules) == []


def test_status_and_global_options_after_the_command_import_nothing_heavy(daemon: RunningDaemon, tmp_path: Path) -> None:
    result, modules = run_probe(tmp_path, "status", "--socket", str(daemon.socket))
    assert result.returncode == 0, result.stderr
    assert f"management:  {daemon.socket}" in result.stdout
    assert heavy_imports(modules) == []


def test_version_imports_nothing_heavy(tmp_path: Path) -> None:
    result, modules = run_probe(tmp_path, "--version")
    assert result.returncode == 0 and result.stdout.startswith("llmd "), result.stderr
    assert heavy_imports(modules) == []
    assert "llmd.daemon.engines.provision" not in modules


def test_ps_with_the_daemon_unreachable_imports_nothing_heavy(tmp_path: Path) -> None:
    result, modules = run_probe(tmp_path, "--socket", str(tmp_path / "absent.sock"), "ps")
    assert result.returncode == 3 and "cannot reach llmd on" in result.stderr
    assert heavy_imports(modules) == []


def test_help_imports_nothing_heavy_nor_the_local_commands(tmp_path: Path) -> None:
    result, modules = run_probe(tmp_path, "--help")
    assert result.returncode == 0 and "doctor" in result.stdout and "profile" in result.stdout
    assert heavy_imports(modules) == []
    assert not {"llmd.daemon.cli.bench", "llmd.daemon.cli.doctor", "llmd.daemon.cli.profile"} & set(modules)


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completing_a_command_name_imports_nothing_heavy(tmp_path: Path, shell: str) -> None:
    cword = "" if shell == "fish" else "1"
    env = {"_LLMCTL_COMPLETE": f"{shell}_complete", "COMP_WORDS": "llmctl ", "COMP_CWORD": cword}
    result, modules = run_probe(tmp_path, env=env)
    assert result.returncode == 0 and "doctor" in result.stdout and "ps" in result.stdout, result.stderr
    assert heavy_imports(modules) == []


def test_completing_a_model_name_from_the_daemon_imports_nothing_heavy(daemon: RunningDaemon, tmp_path: Path) -> None:
    env = {"_LLMCTL_COMPLETE": "bash_complete", "COMP_WORDS": "llmctl load ti", "COMP_CWORD": "2",
           "LLMD_SOCKET": str(daemon.socket)}
    result, modules = run_probe(tmp_path, env=env)
    assert result.returncode == 0 and result.stdout.splitlines() == ["plain,tiny"], (result.stdout, result.stderr)
    assert heavy_imports(modules) == []


def test_the_listed_help_of_each_lazy_command_is_its_own() -> None:
    """`--help` and completion show a lazy command's summary without importing it: it must be
    what the command itself would show, at every width."""
    import click

    from llmd.daemon.cli.main import LOCAL_COMMANDS

    for name, entry in LOCAL_COMMANDS.items():
        command = getattr(import_module(entry.module), entry.attribute)
        assert command.name == name
        stand_in = click.Command(name, help=entry.summary)
        for limit in (30, 45, 70, 1000):
            assert stand_in.get_short_help_str(limit) == command.get_short_help_str(limit), (name, limit)


def test_a_lazy_command_runs_and_is_suggested(tmp_path: Path) -> None:
    result, modules = run_probe(tmp_path, "profile", "--help")
    assert result.returncode == 0 and "Write and list profile files" in result.stdout
    assert "llmd.daemon.cli.profile" in modules
    misspelt, _ = run_probe(tmp_path, "doctr")
    assert misspelt.returncode == 2 and "Did you mean 'doctor'?" in misspelt.stderr


@pytest.mark.parametrize("command", ["load", "plan", "unload", "logs"])
def test_a_model_command_checks_the_name_without_pydantic(tmp_path: Path, command: str) -> None:
    result, modules = run_probe(tmp_path, "--socket", str(tmp_path / "absent.sock"), command, "tiny")
    assert result.returncode == 3 and "cannot reach llmd on" in result.stderr
    assert "llmd.daemon.models.names" in modules  # the name was checked, by the module without pydantic
    assert heavy_imports(modules) == []

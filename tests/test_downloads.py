"""Downloads from the Hugging Face Hub, against a local stand-in for its download routes."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import huggingface_hub
import pytest
from huggingface_hub import constants

from llmd.daemon.models import downloads

from llmd.daemon.models import pull
from llmd.daemon.models.downloads import (
    CorruptDownloadError,
    DiskFullError,
    DownloadCancelledError,
    DownloadInterruptedError,
    DownloadProgress,
    HubAuthError,
    HubUnreachableError,
    ModelNotFoundError,
    download,
    resolve_cached,
)
from llmd.daemon.errors import LlmdError
from llmd.daemon.models.profiles import ModelSource
from llmd.daemon.engines.supervisor import free_port

from hub_standin import HubStandin

MIB = 1024 * 1024
REPO = "acme/tiny-gguf"
GGUF = "tiny-Q8_0.gguf"


def payload(size: int, seed: str) -> bytes:
    """Deterministic bytes that differ by seed (so every file has its own sha256)."""
    block = hashlib.sha256(seed.encode()).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hub() -> Iterator[HubStandin]:
    with HubStandin(token="GOOD") as standin:
        yield standin


@pytest.fixture(autouse=True)
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face home and cache and no token, for this process and its children.

    huggingface_hub reads HF_HUB_CACHE and the token path when imported, so its constants are
    patched too; HF_ENDPOINT is passed as `endpoint=` in-process, and through the environment
    to child processes.
    """
    home = tmp_path / "hf-home"
    cache = home / "hub"
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(downloads, "PROGRESS_INTERVAL", 0.0)
    monkeypatch.setattr(downloads, "RETRY_DELAY", 0.01)
    return cache


def gguf(revision: str | None = None, repo: str = REPO, file: str = GGUF) -> ModelSource:
    return ModelSource(hf_repo=repo, hf_file=file, revision=revision)


def blobs(cache: Path, repo: str = REPO) -> list[Path]:
    folder = cache / f"models--{repo.replace('/', '--')}" / "blobs"
    return sorted(folder.iterdir()) if folder.is_dir() else []


class Recorder(list[DownloadProgress]):
    def __call__(self, progress: DownloadProgress) -> None:
        self.append(progress)


# ----- progress lines -----


def test_progress_line_reads_like_a_progress_bar() -> None:
    line = DownloadProgress("Qwen3-0.6B-Q8_0.gguf", done=int(312.4 * MIB), total=int(639.4 * MIB), rate=48.2 * MIB, eta=7.2)
    assert line.line() == "Qwen3-0.6B-Q8_0.gguf 312.4/639.4 MiB 48.2 MiB/s ETA 7s"
    big = DownloadProgress("m.gguf", done=12 * 1024 * MIB, total=40 * 1024 * MIB, rate=100 * MIB, eta=3725)
    assert big.line() == "m.gguf 12.00/40.00 GiB 100.0 MiB/s ETA 1h02m"
    starting = DownloadProgress("m.gguf", done=0, total=None, rate=0.0, eta=None)
    assert starting.line() == "m.gguf 0.0 KiB"
    snapshot = DownloadProgress(
        "model.safetensors", done=300 * MIB, total=1200 * MIB, rate=50 * MIB, eta=185,
        repo="Qwen/Qwen3-0.6B", files_done=1, files_total=7,
    )
    assert snapshot.line() == "Qwen/Qwen3-0.6B 0.29/1.17 GiB 50.0 MiB/s ETA 3m05s (file 2 of 7: model.safetensors)"


# ----- single files -----


def test_file_download_reports_progress_and_lands_in_the_standard_cache(hub: HubStandin, hf_cache: Path) -> None:
    content = payload(3 * MIB, "gguf")
    hub.add_commit(REPO, {GGUF: content, "README.md": b"# tiny\n"})
    seen = Recorder()

    path = download(gguf(), seen, endpoint=hub.url)

    assert path.is_relative_to(hf_cache / "models--acme--tiny-gguf" / "snapshots")
    assert path.name == GGUF and path.is_symlink()
    assert sha256(path) == hashlib.sha256(content).hexdigest()
    assert len(seen) >= 3
    assert all(p.total == len(content) for p in seen)
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert seen[-1].done == len(content)
    assert seen[-1].line().startswith(f"{GGUF} 3.0/3.0 MiB")
    assert not any(p.name.endswith(".incomplete") for p in blobs(hf_cache))
    assert resolve_cached(gguf()) == path


def test_a_cached_file_is_not_fetched_again(hub: HubStandin) -> None:
    hub.add_commit(REPO, {GGUF: payload(MIB, "gguf")})
    first = download(gguf(), Recorder(), endpoint=hub.url)
    hub.clear()

    again = download(gguf(), Recorder(), endpoint=hub.url)

    assert again == first
    assert hub.gets(GGUF) == [], "the file body was downloaded twice"
    hub.clear()
    assert resolve_cached(gguf()) == first
    assert hub.requests == [], "resolve_cached used the network"


def test_a_model_downloaded_by_another_tool_is_found_without_the_network(hub: HubStandin) -> None:
    commit = hub.add_commit(REPO, {GGUF: payload(MIB, "gguf"), "config.json": b"{}"})
    by_other_tool = Path(huggingface_hub.hf_hub_download(REPO, GGUF, endpoint=hub.url))
    snapshot_by_other_tool = Path(huggingface_hub.snapshot_download(REPO, endpoint=hub.url))
    hub.clear()

    assert resolve_cached(gguf()) == by_other_tool
    assert resolve_cached(ModelSource(hf_repo=REPO)) == snapshot_by_other_tool
    assert resolve_cached(gguf(revision=commit)) == by_other_tool
    assert hub.requests == []

    # Reuse through `download` too: with the Hub answering, only metadata is asked for ...
    assert download(gguf(), Recorder(), endpoint=hub.url) == by_other_tool
    assert hub.gets(GGUF) == []
    # ... and with the Hub gone, the cached copy is used.
    endpoint = hub.url
    hub.stop()
    assert download(gguf(), Recorder(), endpoint=endpoint) == by_other_tool
    assert download(ModelSource(hf_repo=REPO), Recorder(), endpoint=endpoint) == snapshot_by_other_tool


def test_a_pinned_commit_in_the_cache_needs_no_network(hub: HubStandin) -> None:
    commit = hub.add_commit(REPO, {GGUF: payload(MIB, "gguf")})
    path = download(gguf(revision=commit), Recorder(), endpoint=hub.url)
    hub.clear()
    assert download(gguf(revision=commit), Recorder(), endpoint=hub.url) == path
    assert hub.requests == []


def test_revisions_pin_commits_and_tags_and_follow_branches(hub: HubStandin) -> None:
    v1, v2, v3 = payload(MIB, "v1"), payload(MIB, "v2"), payload(MIB, "v3")
    old = hub.add_commit(REPO, {GGUF: v1}, tags=("v1.0",))
    hub.add_commit(REPO, {GGUF: v2})

    by_commit = download(gguf(revision=old), Recorder(), endpoint=hub.url)
    by_tag = download(gguf(revision="v1.0"), Recorder(), endpoint=hub.url)
    on_main = download(gguf(), Recorder(), endpoint=hub.url)
    assert by_commit.read_bytes() == v1 and by_tag == by_commit
    assert on_main.read_bytes() == v2
    assert resolve_cached(gguf(revision="v1.0")) == by_commit

    # main moves on: the cache still answers with what it last saw, a download follows the branch.
    hub.add_commit(REPO, {GGUF: v3})
    assert resolve_cached(gguf()) == on_main
    moved = download(gguf(), Recorder(), endpoint=hub.url)
    assert moved.read_bytes() == v3
    assert resolve_cached(gguf()) == moved
    assert by_commit.read_bytes() == v1, "an older revision must stay intact"


# ----- snapshots -----


def snapshot_files() -> dict[str, bytes]:
    return {
        "config.json": json.dumps({"architectures": ["Tiny"]}).encode(),
        "model.safetensors": payload(2 * MIB, "weights"),
        "tokenizer/vocab.txt": b"a\nb\nc\n",
    }


def test_snapshot_download_fetches_every_file_with_progress(hub: HubStandin, hf_cache: Path) -> None:
    files = snapshot_files()
    commit = hub.add_commit(REPO, files)
    seen = Recorder()

    folder = download(ModelSource(hf_repo=REPO), seen, endpoint=hub.url)

    assert folder == hf_cache / "models--acme--tiny-gguf" / "snapshots" / commit
    for name, content in files.items():
        assert (folder / name).read_bytes() == content
    total = sum(len(content) for content in files.values())
    assert all(p.total == total and p.files_total == 3 for p in seen)
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert seen[-1].done == total and seen[-1].files_done == 3
    assert seen[-1].line().startswith(f"{REPO} 2.0/2.0 MiB")
    assert resolve_cached(ModelSource(hf_repo=REPO)) == folder

    hub.clear()
    assert download(ModelSource(hf_repo=REPO), Recorder(), endpoint=hub.url) == folder
    assert [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path] == []


def test_an_interrupted_snapshot_is_not_mistaken_for_a_complete_one(hub: HubStandin, hf_cache: Path) -> None:
    files = snapshot_files()
    hub.add_commit(REPO, files)
    hub.cut_after("model.safetensors", MIB)
    source = ModelSource(hf_repo=REPO)

    with pytest.raises(DownloadInterruptedError):
        download(source, Recorder(), endpoint=hub.url, retries=0)
    assert resolve_cached(source) is None

    folder = download(source, Recorder(), endpoint=hub.url)
    assert hub.gets("model.safetensors")[-1].range == f"bytes={MIB}-"
    assert (folder / "model.safetensors").read_bytes() == files["model.safetensors"]


# ----- interrupted, cancelled and corrupt transfers -----


def test_an_interrupted_download_resumes_on_the_next_call(hub: HubStandin, hf_cache: Path) -> None:
    content = payload(3 * MIB, "gguf")
    hub.add_commit(REPO, {GGUF: content})
    cut = MIB + 12345
    hub.cut_after(GGUF, cut)

    with pytest.raises(DownloadInterruptedError, match="resumes") as failed:
        download(gguf(), Recorder(), endpoint=hub.url, retries=0)
    assert isinstance(failed.value, LlmdError)

    # Only a partial blob exists, under a name no tool takes for a finished file.
    [partial] = blobs(hf_cache)
    assert partial.name == hashlib.sha256(content).hexdigest() + ".incomplete"
    assert partial.stat().st_size == cut
    assert not (hf_cache / "models--acme--tiny-gguf" / "snapshots").exists()
    assert resolve_cached(gguf()) is None

    seen = Recorder()
    path = download(gguf(), seen, endpoint=hub.url)

    assert hub.gets(GGUF)[-1].range == f"bytes={cut}-"
    assert sha256(path) == hashlib.sha256(content).hexdigest()
    assert seen[0].done == 0 and seen[-1].done == len(content)
    assert [p.name for p in blobs(hf_cache)] == [hashlib.sha256(content).hexdigest()]


def test_a_dropped_connection_is_resumed_within_the_same_call(hub: HubStandin) -> None:
    content = payload(3 * MIB, "gguf")
    hub.add_commit(REPO, {GGUF: content})
    hub.cut_after(GGUF, 2 * MIB)

    path = download(gguf(), Recorder(), endpoint=hub.url)

    assert [r.range for r in hub.gets(GGUF)] == [None, f"bytes={2 * MIB}-"]
    assert path.read_bytes() == content


def test_a_connection_that_keeps_failing_gives_up_with_a_clear_error(hub: HubStandin, hf_cache: Path) -> None:
    hub.add_commit(REPO, {GGUF: payload(MIB, "gguf")})
    hub.cut_after(GGUF, 0, times=100)

    with pytest.raises(DownloadInterruptedError, match=rf"{REPO}/{GGUF} from {hub.url} failed after 3 tries in a row .* resumes"):
        download(gguf(), Recorder(), endpoint=hub.url, retries=2)
    assert len(hub.gets(GGUF)) == 3


def test_cancelling_keeps_the_partial_file_for_the_next_call(hub: HubStandin, hf_cache: Path) -> None:
    content = payload(4 * MIB, "gguf")
    hub.add_commit(REPO, {GGUF: content})
    cancel = threading.Event()

    def cancel_after_a_mib(progress: DownloadProgress) -> None:
        if progress.done >= MIB:
            cancel.set()

    with pytest.raises(DownloadCancelledError, match="cancelled"):
        download(gguf(), cancel_after_a_mib, endpoint=hub.url, cancel=cancel)
    [partial] = blobs(hf_cache)
    kept = partial.stat().st_size
    assert partial.name.endswith(".incomplete") and MIB <= kept < len(content)

    path = download(gguf(), Recorder(), endpoint=hub.url)
    assert hub.gets(GGUF)[-1].range == f"bytes={kept}-"
    assert path.read_bytes() == content


def test_a_corrupt_transfer_leaves_nothing_that_looks_complete(hub: HubStandin, hf_cache: Path) -> None:
    hub.add_commit(REPO, {GGUF: payload(MIB, "gguf")})
    hub.corrupt(GGUF)

    with pytest.raises(CorruptDownloadError, match="sha256"):
        download(gguf(), Recorder(), endpoint=hub.url)
    assert blobs(hf_cache) == []
    assert resolve_cached(gguf()) is None


def test_a_corrupt_partial_file_is_downloaded_again_from_scratch(hub: HubStandin, hf_cache: Path) -> None:
    content = payload(2 * MIB, "gguf")
    hub.add_commit(REPO, {GGUF: content})
    hub.cut_after(GGUF, MIB)
    with pytest.raises(DownloadInterruptedError):
        download(gguf(), Recorder(), endpoint=hub.url, retries=0)
    [partial] = blobs(hf_cache)
    partial.write_bytes(b"\0" * MIB)  # say, left behind by a crash before the data reached the disk

    path = download(gguf(), Recorder(), endpoint=hub.url)

    assert [r.range for r in hub.gets(GGUF)][-2:] == [f"bytes={MIB}-", None]
    assert path.read_bytes() == content


def test_a_download_waits_for_huggingface_hubs_lock_on_the_same_file(hub: HubStandin, hf_cache: Path) -> None:
    """Another process fetching the same blob with huggingface_hub holds its lock: we wait, never write alongside."""
    from huggingface_hub.utils import WeakFileLock

    content = payload(MIB, "gguf")
    hub.add_commit(REPO, {GGUF: content})
    lock = hf_cache / ".locks" / "models--acme--tiny-gguf" / f"{hashlib.sha256(content).hexdigest()}.lock"
    lock.parent.mkdir(parents=True)
    result: list[Path] = []
    with WeakFileLock(lock):
        worker = threading.Thread(target=lambda: result.append(download(gguf(), Recorder(), endpoint=hub.url)))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive() and hub.gets(GGUF) == []
    worker.join(30)
    assert result and result[0].read_bytes() == content


# ----- tokens -----


def test_hf_token_from_the_environment_is_sent(hub: HubStandin, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_commit(REPO, {GGUF: payload(MIB, "gguf")}, private=True)
    monkeypatch.setenv("HF_TOKEN", "GOOD")

    path = download(gguf(), Recorder(), endpoint=hub.url)

    assert path.is_file()
    assert hub.requests and all(r.authorization == "Bearer GOOD" for r in hub.requests)


def test_an_explicit_token_wins_over_hf_token(hub: HubStandin, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_commit(REPO, {GGUF: payload(MIB, "gguf")}, private=True)
    monkeypatch.setenv("HF_TOKEN", "BAD")
    assert download(gguf(), Recorder(), endpoint=hub.url, token="GOOD").is_file()


def test_a_private_repo_without_a_token_says_to_set_hf_token(hub: HubStandin) -> None:
    hub.add_commit(REPO, {GGUF: payload(MIB, "gguf")}, private=True)
    with pytest.raises(HubAuthError, match=f"set HF_TOKEN to a token with access to {REPO}"):
        download(gguf(), Recorder(), endpoint=hub.url)
    with pytest.raises(HubAuthError, match=f"set HF_TOKEN to a token with access to {REPO}"):
        download(ModelSource(hf_repo=REPO), Recorder(), endpoint=hub.url)


def test_a_bad_token_is_reported_as_rejected(hub: HubStandin, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_commit(REPO, {GGUF: payload(MIB, "gguf")}, private=True)
    monkeypatch.setenv("HF_TOKEN", "BAD")
    expected = f"rejected the token from HF_TOKEN .*set HF_TOKEN to a valid token with access to {REPO}"
    with pytest.raises(HubAuthError, match=expected):
        download(gguf(), Recorder(), endpoint=hub.url)
    with pytest.raises(HubAuthError, match=expected):
        download(ModelSource(hf_repo=REPO), Recorder(), endpoint=hub.url)
    assert blobs(hf_cache) == []


def test_hf_endpoint_and_hf_token_reach_a_fresh_process(hub: HubStandin, hf_cache: Path) -> None:
    """What the daemon does: huggingface_hub picks HF_ENDPOINT and HF_TOKEN up from its environment."""
    content = payload(MIB, "gguf")
    hub.add_commit(REPO, {GGUF: content}, private=True)
    script = (
        "from llmd.daemon.models.downloads import download\n"
        "from llmd.daemon.models.profiles import ModelSource\n"
        f"print(download(ModelSource(hf_repo={REPO!r}, hf_file={GGUF!r}), lambda p: None))\n"
    )
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "GOOD"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.is_relative_to(hf_cache) and path.read_bytes() == content
    to_repo = [r for r in hub.requests if r.path.startswith(f"/{REPO}/")]
    assert to_repo and all(r.authorization == "Bearer GOOD" for r in to_repo)


# ----- what cannot be found, reached or stored -----


def test_a_missing_repo_file_or_revision_names_the_field_to_fix(hub: HubStandin) -> None:
    hub.add_commit(REPO, {GGUF: payload(MIB, "gguf")})
    with pytest.raises(ModelNotFoundError, match="fix \\[model\\] hf_file"):
        download(gguf(file="missing.gguf"), Recorder(), endpoint=hub.url)
    with pytest.raises(ModelNotFoundError, match="fix \\[model\\] revision"):
        download(gguf(revision="no-such-branch"), Recorder(), endpoint=hub.url)
    with pytest.raises(ModelNotFoundError, match="fix \\[model\\] revision"):
        download(ModelSource(hf_repo=REPO, revision="no-such-branch"), Recorder(), endpoint=hub.url)
    with pytest.raises(ModelNotFoundError, match="fix \\[model\\] hf_repo"):
        download(gguf(repo="acme/nothing-here"), Recorder(), endpoint=hub.url, token="GOOD")
    with pytest.raises(ModelNotFoundError, match="fix \\[model\\] hf_repo"):
        download(gguf(repo="not a repo id"), Recorder(), endpoint=hub.url)
    # Without a token the Hub cannot tell a missing repo from a private one, and neither can we.
    with pytest.raises(HubAuthError, match="set HF_TOKEN .*or fix \\[model\\] hf_repo"):
        download(gguf(repo="acme/nothing-here"), Recorder(), endpoint=hub.url)


def test_an_unreachable_hub_names_the_endpoint() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(HubUnreachableError, match=f"cannot reach the Hugging Face Hub at {endpoint}.*HF_ENDPOINT"):
        download(gguf(), Recorder(), endpoint=endpoint)
    with pytest.raises(HubUnreachableError, match=endpoint):
        download(ModelSource(hf_repo=REPO), Recorder(), endpoint=endpoint)


def test_no_room_on_disk_is_reported_before_the_transfer(hub: HubStandin, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_commit(REPO, {GGUF: payload(MIB, "gguf")})
    monkeypatch.setattr(downloads.shutil, "disk_usage", lambda path: _Usage(free=1000))
    with pytest.raises(DiskFullError, match="not enough disk space .* HF_HUB_CACHE"):
        download(gguf(), Recorder(), endpoint=hub.url)
    assert hub.gets(GGUF) == []


def test_a_disk_that_fills_up_mid_transfer_is_reported(hub: HubStandin, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_commit(REPO, {GGUF: payload(MIB, "gguf")})

    def full(self: object, chunk: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(downloads._Partial, "write", full)
    with pytest.raises(DiskFullError, match="filled up .* HF_HUB_CACHE"):
        download(gguf(), Recorder(), endpoint=hub.url)
    assert resolve_cached(gguf()) is None


class _Usage:
    """What shutil.disk_usage returns, for a nearly full disk."""

    def __init__(self, free: int) -> None:
        self.total = self.used = 0
        self.free = free


# ----- fetch_model: the event-loop side -----


@pytest.mark.anyio
async def test_fetch_model_relays_progress_lines_and_uses_the_cache(hub: HubStandin, monkeypatch: pytest.MonkeyPatch) -> None:
    content = payload(2 * MIB, "gguf")
    hub.add_commit(REPO, {GGUF: content})
    monkeypatch.setattr(pull, "REPORT_INTERVAL", 0.01)
    lines: list[str] = []

    path = await pull.fetch_model(gguf(), lines.append, endpoint=hub.url)

    assert path.read_bytes() == content
    assert lines[0] == f"asking the Hugging Face Hub about {REPO}/{GGUF}"
    assert lines[-1].startswith(f"{GGUF} 2.0/2.0 MiB")
    hub.clear()
    lines.clear()
    assert await pull.fetch_model(gguf(), lines.append, endpoint=hub.url) == path
    assert hub.requests == [] and lines == []


@pytest.mark.anyio
async def test_cancelling_fetch_model_stops_the_transfer_and_it_resumes_later(
    hub: HubStandin, hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = payload(8 * MIB, "gguf")
    hub.add_commit(REPO, {GGUF: content})
    monkeypatch.setattr(pull, "REPORT_INTERVAL", 0.01)
    started = anyio.Event()

    def on_progress(line: str) -> None:
        if "MiB" in line and not line.startswith(f"{GGUF} 0.0"):
            started.set()

    slow_write = downloads._Partial.write

    def write_slowly(self: downloads._Partial, chunk: bytes) -> None:
        slow_write(self, chunk)
        threading.Event().wait(0.002)

    monkeypatch.setattr(downloads._Partial, "write", write_slowly)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(pull.fetch_model, gguf(), on_progress, endpoint=hub.url))
            await started.wait()
            tg.cancel_scope.cancel()

    [partial] = blobs(hf_cache)
    assert partial.name.endswith(".incomplete")
    kept = partial.stat().st_size
    assert 0 < kept < len(content)

    monkeypatch.setattr(downloads._Partial, "write", slow_write)
    path = await pull.fetch_model(gguf(), lambda line: None, endpoint=hub.url)
    assert hub.gets(GGUF)[-1].range == f"bytes={kept}-"
    assert path.read_bytes() == content


@pytest.mark.anyio
async def test_fetch_model_raises_the_download_error_itself(hub: HubStandin) -> None:
    hub.add_commit(REPO, {GGUF: payload(MIB, "gguf")}, private=True)
    with pytest.raises(HubAuthError, match="set HF_TOKEN"):
        await pull.fetch_model(gguf(), lambda line: None, endpoint=hub.url)

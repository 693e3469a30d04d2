"""Model weights from the Hugging Face Hub, kept in the standard Hugging Face cache.

Files land where `huggingface_hub` puts them (`$HF_HUB_CACHE`, by default
`~/.cache/huggingface/hub`), so models fetched by other tools are found and reused, and what
llmd fetches is visible to them. `HF_TOKEN` and `HF_ENDPOINT` are honoured through
`huggingface_hub`, which reads them (HF_ENDPOINT when it is imported).

`huggingface_hub` resolves revisions, lists repos, checks tokens and links finished files
into the cache's snapshots. The bytes themselves are fetched here, into
`blobs/<etag>.incomplete`, because a transfer must survive more than one call: a dropped
connection, a cancelled load or a restarted daemon resumes from the bytes already on disk
with an HTTP `Range` request. A blob only gets its final name once its size (and, for LFS
files, its sha256) has been checked, so a half-written file never looks complete.

`download` blocks; run it in a worker thread (`llmd.daemon.models.pull.fetch_model` does).
`open_remote_file` reads byte ranges of a file without downloading it (a GGUF's header, for
`llmctl plan` before a pull), with the same endpoint, token and error messages.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import httpx
from huggingface_hub import (
    HfApi,
    HfFileMetadata,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers, get_token
from huggingface_hub.utils import tqdm as hf_tqdm

from llmd.daemon.util.atomic_write import write_atomic
from llmd.daemon.errors import LlmdError
from llmd.daemon.models.profiles import ModelSource

log = logging.getLogger(__name__)

# A progress callback is called at most this often (plus once at the start and once at the end).
PROGRESS_INTERVAL = 0.25
# The transfer rate is measured over this many trailing seconds.
RATE_WINDOW = 5.0
# A dropped transfer is retried (resuming) this many times within one call; a try that moved
# bytes forward restores the count. The wait before retry N is RETRY_DELAY * 2**(N-1), up to 30 s.
RETRIES = 5
RETRY_DELAY = 1.0
# Seconds to wait for the connection, and for each read, before a try counts as failed.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)
# How often a wait on another process's download of the same file checks for cancellation.
LOCK_POLL = 0.2
# Tries for one byte-range read of a remote file (a dropped connection or a 5xx answer is retried).
RANGE_TRIES = 3

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MIB = 1024 * 1024
_GIB = 1024 * _MIB
_HASH_BLOCK = 8 * _MIB


# ----- errors -----


class DownloadError(LlmdError):
    """A model could not be fetched from the Hugging Face Hub; the message says why and what to do."""


class ModelNotFoundError(DownloadError):
    """The repo, revision or file named in the profile does not exist (or is hidden from this token)."""


class HubAuthError(DownloadError):
    """The Hub wants a token, rejected the one sent, or the token has no access to the repo."""


class HubUnreachableError(DownloadError):
    """No usable answer from the Hub: network down, endpoint wrong, offline mode, or the Hub failing."""


class DiskFullError(DownloadError):
    """The cache's disk has no room for the file."""


class DownloadInterruptedError(DownloadError):
    """The transfer kept failing; what arrived is kept and the next call resumes from it."""


class CorruptDownloadError(DownloadError):
    """The bytes received do not match the file's size or sha256; they were deleted."""


class DownloadCancelledError(DownloadError):
    """The caller cancelled; what arrived is kept and the next call resumes from it."""


# ----- progress -----


@dataclass(frozen=True)
class DownloadProgress:
    """Where a download stands. For a snapshot the byte counts cover every file still to fetch."""

    filename: str  # the file being fetched now
    done: int  # bytes complete on disk (resumed bytes included)
    total: int | None  # bytes in all, when known
    rate: float  # bytes per second over the last few seconds; 0.0 before any arrived
    eta: float | None  # seconds left at that rate, when both are known
    repo: str = ""
    files_done: int = 0
    files_total: int = 1

    def line(self) -> str:
        """One line for people, e.g. "Qwen3-0.6B-Q8_0.gguf 312.4/639.4 MiB 48.2 MiB/s ETA 7s"."""
        snapshot = self.files_total > 1
        parts = [self.repo if snapshot and self.repo else self.filename]
        scale = self.total if self.total is not None else self.done
        unit, divisor, digits = (
            ("GiB", _GIB, 2) if scale >= _GIB else ("MiB", _MIB, 1) if scale >= _MIB else ("KiB", 1024, 1)
        )
        if self.total is None:
            parts.append(f"{self.done / divisor:.{digits}f} {unit}")
        else:
            parts.append(f"{self.done / divisor:.{digits}f}/{self.total / divisor:.{digits}f} {unit}")
        if self.rate > 0:
            parts.append(f"{self.rate / _MIB:.1f} MiB/s")
        if self.eta is not None and (self.total is None or self.done < self.total):
            parts.append(f"ETA {_format_eta(self.eta)}")
        text = " ".join(parts)
        if snapshot:
            text += f" (file {min(self.files_done + 1, self.files_total)} of {self.files_total}: {self.filename})"
        return text


def _format_eta(seconds: float) -> str:
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


ProgressCallback = Callable[[DownloadProgress], None]


class _Meter:
    """Counts bytes for one `download` call and reports them, throttled, to the callback."""

    def __init__(self, callback: ProgressCallback, repo: str) -> None:
        self._callback = callback
        self._repo = repo
        self.filename = ""
        self.total: int | None = None
        self.files_done = 0
        self.files_total = 1
        self._finished_bytes = 0  # files complete in this call
        self._current = 0  # bytes on disk of the file being fetched
        self._moved = 0  # bytes that crossed the network in this call
        self._samples: deque[tuple[float, int]] = deque()
        self._last_report = float("-inf")

    @property
    def done(self) -> int:
        return self._finished_bytes + self._current

    def plan(self, total: int | None, files_total: int) -> None:
        self.total, self.files_total = total, files_total

    def start_file(self, filename: str) -> None:
        self.filename, self._current = filename, 0
        self.report(force=True)

    def at(self, nbytes: int) -> None:
        """The current file has `nbytes` on disk (resumed from an earlier try, or reset to 0)."""
        self._current = nbytes

    def moved(self, nbytes: int) -> None:
        self._current += nbytes
        self._moved += nbytes
        self.report()

    def end_file(self, size: int) -> None:
        self._finished_bytes += size
        self._current = 0
        self.files_done += 1

    def finish(self) -> None:
        self.report(force=True)

    def snapshot(self) -> DownloadProgress:
        now = time.monotonic()
        self._samples.append((now, self._moved))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()
        first_time, first_moved = self._samples[0]
        span = now - first_time
        rate = (self._moved - first_moved) / span if span > 0 else 0.0
        eta = max(0, self.total - self.done) / rate if rate > 0 and self.total is not None else None
        return DownloadProgress(
            filename=self.filename, done=self.done, total=self.total, rate=rate, eta=eta,
            repo=self._repo, files_done=self.files_done, files_total=self.files_total,
        )

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_report < PROGRESS_INTERVAL:
            return
        self._last_report = now
        self._callback(self.snapshot())


class _QuietBar(hf_tqdm):
    """huggingface_hub's progress bars, never drawn: progress goes to the callback instead."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


# ----- the cache -----


def hub_cache_dir() -> Path:
    """The Hugging Face cache in use: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub."""
    return Path(constants.HF_HUB_CACHE).expanduser()


def resolve_cached(source: ModelSource, *, cache_dir: Path | None = None) -> Path | None:
    """The local path of `source` if it is complete on disk, without touching the network.

    A `path` source is returned when it exists. An `hf_repo` source is looked up in the
    Hugging Face cache at its revision (a branch or tag as last seen by any tool that used
    the cache): a file must be fully downloaded, and a snapshot must not be missing files
    that the cached listing of its commit names.
    """
    if source.path is not None:
        return source.path if source.path.exists() else None
    assert source.hf_repo is not None
    cache = str(cache_dir or hub_cache_dir())
    revision = source.revision or constants.DEFAULT_REVISION
    try:
        if source.hf_file:
            found = try_to_load_from_cache(source.hf_repo, source.hf_file, cache_dir=cache, revision=revision)
            return Path(found) if isinstance(found, str) else None
        folder = Path(snapshot_download(source.hf_repo, revision=revision, cache_dir=cache, local_files_only=True))
    except (hf_errors.LocalEntryNotFoundError, hf_errors.HFValidationError):
        return None
    # A snapshot folder without any file is what an interrupted download leaves behind.
    return folder if folder.is_dir() and any(p.is_file() for p in folder.rglob("*")) else None


# ----- downloading -----


def download(
    source: ModelSource,
    progress: ProgressCallback,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
    cancel: threading.Event | None = None,
    retries: int = RETRIES,
) -> Path:
    """Fetch `source` into the Hugging Face cache and return its local path (blocking).

    With `hf_file` the path is that file; without, it is the snapshot folder of the whole
    repo. The Hub is asked what the revision (default "main") points to now; files already
    in the cache are not fetched again, and a commit-hash revision that is cached needs no
    network at all. If the Hub cannot be reached but the cache has the revision, the cached
    copy is returned.

    `token` defaults to `HF_TOKEN` (or the token stored by `hf auth login`), `endpoint` to
    `HF_ENDPOINT`, `cache_dir` to `HF_HUB_CACHE`. `progress` is called from this thread.
    Setting `cancel` stops the transfer within one network read; the bytes already fetched
    are kept, and the next call resumes from them. A dropped connection is resumed up to
    `retries` times in a row within the call. Raises a `DownloadError` subclass; an exception
    raised by `progress` aborts the download the same way a cancel does.
    """
    if source.hf_repo is None:
        raise ValueError(f"download() needs a Hugging Face source (hf_repo), not a local path: {source.path}")
    revision = source.revision or constants.DEFAULT_REVISION
    if _COMMIT.match(revision):
        cached = resolve_cached(source, cache_dir=cache_dir)
        if cached is not None:
            return cached
    job = _Job(
        repo=source.hf_repo,
        revision=revision,
        endpoint=(endpoint or constants.ENDPOINT).rstrip("/"),
        token=token,
        cache=Path(cache_dir) if cache_dir is not None else hub_cache_dir(),
        meter=_Meter(progress, source.hf_repo),
        cancel=cancel,
        retries=retries,
    )
    try:
        with job.translated(source.hf_file):
            return job.fetch_file(source.hf_file) if source.hf_file else job.fetch_snapshot()
    except HubUnreachableError as exc:
        cached = resolve_cached(source, cache_dir=cache_dir)
        if cached is None:
            raise
        log.warning("%s; using the copy already in the cache: %s", exc, cached)
        return cached


def list_repo_files(repo: str, revision: str | None = None, *, token: str | None = None,
                    endpoint: str | None = None) -> tuple[str, list[tuple[str, int]]]:
    """(commit, [(path, size in bytes)]) of every file in `repo` at `revision`, without
    downloading any. Failures raise the same DownloadErrors `download` does, naming the fix."""
    wanted = revision or constants.DEFAULT_REVISION
    job = _Job(
        repo=repo, revision=wanted, endpoint=(endpoint or constants.ENDPOINT).rstrip("/"), token=token,
        cache=hub_cache_dir(), meter=_Meter(lambda _: None, repo), cancel=None, retries=0,
    )
    api = HfApi(endpoint=job.endpoint, token=token)
    with job.translated(None):
        commit = api.repo_info(repo, revision=wanted).sha or wanted
        tree = api.list_repo_tree(repo, revision=commit, recursive=True)
        files = [(entry.path, _file_size(entry)) for entry in tree if isinstance(entry, RepoFile)]
    return commit, files


# ----- reading byte ranges without downloading -----


def open_remote_file(repo: str, filename: str, revision: str | None = None, *, token: str | None = None,
                     endpoint: str | None = None) -> RemoteFile:
    """`filename` in `repo` at `revision` on the Hub, to read byte ranges of without downloading
    it: one HEAD request now (which commit, etag and size), a GET per `read_range`. Failures
    raise the DownloadErrors `download` does, naming the endpoint and the fix."""
    job = _Job(
        repo=repo, revision=revision or constants.DEFAULT_REVISION,
        endpoint=(endpoint or constants.ENDPOINT).rstrip("/"), token=token, cache=hub_cache_dir(),
        meter=_Meter(lambda _: None, repo), cancel=None, retries=0,
    )
    with job.translated(filename):
        meta = job._metadata(filename, job.revision)
    return RemoteFile(job, filename, meta)


class RemoteFile:
    """One file on the Hub, read a byte range at a time (HTTP `Range:` requests) and never
    stored: nothing of it enters the Hugging Face cache. Close it when done (or use `with`)."""

    def __init__(self, job: _Job, filename: str, meta: HfFileMetadata) -> None:
        self.repo = job.repo
        self.revision = job.revision
        self.filename = filename
        self.endpoint = job.endpoint
        self.commit: str = meta.commit_hash or ""
        self.etag: str = meta.etag or ""
        self.size: int | None = meta.size
        self._job = job
        self._url = meta.location
        self._client = httpx.Client(follow_redirects=True, timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT))

    def __enter__(self) -> RemoteFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def read_range(self, start: int, end: int) -> bytes:
        """The bytes [start, end) of the file; fewer where the file ends before `end`."""
        failures = 0
        while True:
            try:
                with self._job.translated(self.filename):
                    return self._get(start, end)
            except _Retryable as exc:
                failures += 1
                if failures >= RANGE_TRIES:
                    raise HubUnreachableError(
                        f"reading {self.repo}/{self.filename} from {self.endpoint} failed {failures} times in a row "
                        f"({exc}); check the network, or set HF_ENDPOINT to a reachable Hub mirror"
                    ) from exc
                time.sleep(RETRY_DELAY * 2 ** (failures - 1))

    def _get(self, start: int, end: int) -> bytes:
        headers = self._job._headers(self._url)
        headers["Range"] = f"bytes={start}-{end - 1}"
        try:
            with self._client.stream("GET", self._url, headers=headers) as response:
                status = response.status_code
                if status == 416:
                    return b""  # the file ends before `start`
                if status in (408, 429) or status >= 500:
                    raise _Retryable(f"the server answered HTTP {status}")
                if status not in (200, 206):
                    raise self._job._status_error(status, self.filename)
                if status == 206 and not _range_starts_at(response, start):
                    raise DownloadError(
                        f"{self.endpoint} answered a request for bytes {start}-{end - 1} of {self.repo}/{self.filename} "
                        f"with others ({response.headers.get('Content-Range')!r}); check HF_ENDPOINT and any proxy"
                    )
                # A 200 is the whole file (the server ignored `Range`): skip to `start`, stop at `end`.
                return _first_bytes(response.iter_bytes(), start if status == 200 else 0, end - start)
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc or 'connection lost'}") from None


def _first_bytes(chunks: Iterator[bytes], skip: int, count: int) -> bytes:
    """`count` bytes from a body after its first `skip`, reading no further than that."""
    out = bytearray()
    for chunk in chunks:
        if skip:
            if len(chunk) <= skip:
                skip -= len(chunk)
                continue
            chunk, skip = chunk[skip:], 0
        out += chunk[:count - len(out)]
        if len(out) >= count:
            break
    return bytes(out)


@dataclass
class _Job:
    """One `download` call: what to fetch, from where, into where, and how it goes."""

    repo: str
    revision: str
    endpoint: str
    token: str | None
    cache: Path
    meter: _Meter
    cancel: threading.Event | None
    retries: int

    @property
    def storage(self) -> Path:
        return self.cache / repo_folder_name(repo_id=self.repo, repo_type="model")

    # --- the two kinds of source ---

    def fetch_file(self, filename: str) -> Path:
        meta = self._metadata(filename, self.revision)
        self.meter.plan(meta.size, 1)
        self.meter.end_file(self._ensure_blob(filename, meta))
        self.meter.finish()
        # Pinned to the commit the metadata came from, so the file linked is the file fetched.
        path = hf_hub_download(
            self.repo, filename, revision=meta.commit_hash, cache_dir=str(self.cache),
            endpoint=self.endpoint, token=self.token, tqdm_class=_QuietBar,
        )
        self._record_ref(meta.commit_hash)
        return Path(path)

    def fetch_snapshot(self) -> Path:
        api = HfApi(endpoint=self.endpoint, token=self.token)
        commit = self.revision
        if not _COMMIT.match(commit):
            commit = api.repo_info(self.repo, revision=self.revision).sha or ""
            if not _COMMIT.match(commit):
                raise DownloadError(
                    f"the Hub at {self.endpoint} did not say which commit {self.repo}@{self.revision} is; "
                    "check that HF_ENDPOINT points to a Hugging Face Hub"
                )
        tree = api.list_repo_tree(self.repo, revision=commit, recursive=True)
        files = [entry for entry in tree if isinstance(entry, RepoFile)]
        folder = self.storage / "snapshots" / commit
        missing = [entry for entry in files if not (folder / entry.path).is_file()]
        self.meter.plan(sum(_file_size(entry) for entry in missing), len(missing))
        for entry in missing:
            self._check_cancel(entry.path)
            with self.translated(entry.path):
                self.meter.end_file(self._ensure_blob(entry.path, self._metadata(entry.path, commit)))
        if missing:
            self.meter.finish()
        # Every blob is in place: huggingface_hub links them into the snapshot (no transfer left)
        # and records the commit's file listing, which later tells a complete snapshot from a partial one.
        path = snapshot_download(
            self.repo, revision=commit, cache_dir=str(self.cache), endpoint=self.endpoint,
            token=self.token, tqdm_class=_QuietBar,
        )
        self._record_ref(commit)
        return Path(path)

    # --- one file ---

    def _metadata(self, filename: str, revision: str) -> HfFileMetadata:
        url = hf_hub_url(self.repo, filename, revision=revision, endpoint=self.endpoint)
        meta = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint)
        if not meta.commit_hash or not meta.etag:
            raise DownloadError(
                f"{self.endpoint} answered for {self.repo}/{filename} without the X-Repo-Commit and ETag headers a "
                "Hugging Face Hub sends; check that HF_ENDPOINT points to a Hub (or a mirror of it)"
            )
        return meta

    def _ensure_blob(self, filename: str, meta: HfFileMetadata) -> int:
        """Make `blobs/<etag>` complete and checked, resuming any earlier partial transfer; return its size."""
        self.meter.start_file(filename)
        blob = self.storage / "blobs" / meta.etag
        if blob.exists():
            return blob.stat().st_size
        blob.parent.mkdir(parents=True, exist_ok=True)
        with self._blob_lock(filename, meta.etag):
            if blob.exists():  # another process finished it while we waited
                return blob.stat().st_size
            partial = _Partial(blob.with_name(blob.name + ".incomplete"), meta.etag if _SHA256.match(meta.etag) else None)
            log.info("downloading %s/%s (%s bytes) into %s", self.repo, filename, meta.size, blob)
            self._transfer_with_retries(filename, meta, partial)
            what = f"{self.repo}/{filename}"
            try:
                partial.verify(meta.size, what)
            except CorruptDownloadError:
                if not partial.resumed:
                    raise
                # The bytes kept from an earlier try were bad: start over from zero, once.
                log.warning("%s/%s: the resumed partial download was corrupt; downloading it again", self.repo, filename)
                partial.reset()
                self.meter.at(0)
                self._transfer_with_retries(filename, meta, partial)
                partial.verify(meta.size, what)
            partial.publish(blob)
            log.info("downloaded %s/%s", self.repo, filename)
            return blob.stat().st_size

    def _transfer_with_retries(self, filename: str, meta: HfFileMetadata, partial: _Partial) -> None:
        failures = 0
        with httpx.Client(
            follow_redirects=True, timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT)
        ) as client:
            while True:
                self._check_cancel(filename, partial)
                before = partial.size
                try:
                    self._transfer(client, filename, meta, partial)
                    return
                except _Retryable as exc:
                    failures = 1 if partial.size > before else failures + 1
                    if failures > self.retries:
                        tries = "1 try" if failures == 1 else f"{failures} tries in a row"
                        raise DownloadInterruptedError(
                            f"downloading {self.repo}/{filename} from {self.endpoint} failed after {tries} ({exc}); "
                            f"{_size(partial.size)} of {_size(meta.size)} are kept in {partial.path} and the next "
                            "download resumes from there. Check the network, then try again"
                        ) from exc
                    delay = min(RETRY_DELAY * 2 ** (failures - 1), 30.0)
                    log.warning("%s/%s: %s; resuming from byte %d in %.0fs", self.repo, filename, exc, partial.size, delay)
                    self._pause(delay, filename, partial)

    def _transfer(self, client: httpx.Client, filename: str, meta: HfFileMetadata, partial: _Partial) -> None:
        """One GET from where the partial file ends to the end of the file."""
        size = meta.size
        what = f"{self.repo}/{filename}"
        try:
            have = partial.open()
            if size is not None and have > size:
                partial.reset()
                have = 0
            self.meter.at(have)
            if size is not None and have == size:
                return
            if size is not None:
                _check_room(partial.path.parent, size - have, what)
            headers = self._headers(meta.location)
            if have:
                headers["Range"] = f"bytes={have}-"
            with client.stream("GET", meta.location, headers=headers) as response:
                if have and response.status_code == 416:
                    # The partial does not fit the file: throw it away and start over.
                    partial.reset()
                    self.meter.at(0)
                    raise _Retryable("the server refused to resume (HTTP 416)")
                if response.status_code in (408, 429) or response.status_code >= 500:
                    raise _Retryable(f"the server answered HTTP {response.status_code}")
                if response.status_code not in (200, 206):
                    raise self._status_error(response.status_code, filename)
                if have and (response.status_code == 200 or not _range_starts_at(response, have)):
                    partial.reset()  # the server sent the whole file after all
                    self.meter.at(0)
                for chunk in response.iter_bytes():
                    if self.cancel is not None and self.cancel.is_set():
                        break
                    partial.write(chunk)
                    self.meter.moved(len(chunk))
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc or 'connection lost'}") from None
        except OSError as exc:
            raise _disk_error(exc, partial.path, what) from exc
        finally:
            partial.close()
        self._check_cancel(filename, partial)
        if size is not None and partial.size < size:
            raise _Retryable(f"the connection ended after {partial.size} of {size} bytes")

    def _headers(self, url: str) -> dict[str, str]:
        headers = build_hf_headers(token=self.token)
        headers["Accept-Encoding"] = "identity"  # sizes and ranges refer to the file's own bytes
        if urlsplit(url).netloc != urlsplit(self.endpoint).netloc:
            headers.pop("authorization", None)  # a signed CDN address: the token stays with the Hub
        return headers

    @contextlib.contextmanager
    def _blob_lock(self, filename: str, etag: str) -> Iterator[None]:
        """The lock huggingface_hub takes for the same blob, so two processes never write one file."""
        path = self.cache / ".locks" / repo_folder_name(repo_id=self.repo, repo_type="model") / f"{etag}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        waited = False
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if not waited:
                    log.info("waiting for another download of %s/%s to finish (%s)", self.repo, filename, path)
                    waited = True
                self._pause(LOCK_POLL, filename)
                continue
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the lock file was replaced while we took it: take the new one
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _record_ref(self, commit: str) -> None:
        """Remember which commit a branch or tag named, as huggingface_hub does in `refs/`."""
        if self.revision == commit:
            return
        ref = self.storage / "refs" / self.revision
        try:
            if ref.is_file() and ref.read_text() == commit:
                return
            write_atomic(ref, commit)
        except OSError as exc:
            log.warning("could not record %s -> %s in %s: %s", self.revision, commit, ref, exc)

    def _pause(self, seconds: float, filename: str, partial: _Partial | None = None) -> None:
        """Sleep, but raise DownloadCancelledError as soon as `cancel` is set."""
        if self.cancel is None:
            time.sleep(seconds)
        elif self.cancel.wait(seconds):
            self._check_cancel(filename, partial)

    def _check_cancel(self, filename: str, partial: _Partial | None = None) -> None:
        if self.cancel is None or not self.cancel.is_set():
            return
        kept = ""
        if partial is not None and partial.size:
            kept = f"; {_size(partial.size)} are kept in {partial.path} and the next download resumes from there"
        raise DownloadCancelledError(f"the download of {self.repo}/{filename} was cancelled{kept}")

    # --- errors ---

    @contextlib.contextmanager
    def translated(self, filename: str | None) -> Iterator[None]:
        """Turn huggingface_hub, network and disk errors into DownloadErrors that name the fix."""
        try:
            yield
        except DownloadError:
            raise
        except Exception as exc:
            mapped = self._translate(exc, filename)
            if mapped is None:
                raise
            raise mapped from exc

    def _translate(self, exc: Exception, filename: str | None) -> DownloadError | None:
        where = f"{self.repo}@{self.revision}" if self.revision != constants.DEFAULT_REVISION else self.repo
        if isinstance(exc, hf_errors.HFValidationError):
            return ModelNotFoundError(
                f"{self.repo!r} with revision {self.revision!r} cannot name a Hugging Face repo ({_short(exc)}); "
                'fix [model] hf_repo ("owner/name") or revision in the profile'
            )
        if isinstance(exc, hf_errors.GatedRepoError):
            return HubAuthError(
                f"{self.repo} is gated: accept its terms at {self.endpoint}/{self.repo} with your account, then "
                f"set HF_TOKEN to a token of that account with access to {self.repo}"
            )
        if isinstance(exc, hf_errors.RevisionNotFoundError):
            return ModelNotFoundError(
                f"revision {self.revision!r} does not exist in {self.repo} at {self.endpoint}; "
                "fix [model] revision in the profile (a branch, tag or commit hash)"
            )
        if isinstance(exc, hf_errors.RemoteEntryNotFoundError):
            return ModelNotFoundError(
                f"{self.repo} has no file {filename!r} at revision {self.revision!r} ({self.endpoint}); "
                "fix [model] hf_file in the profile"
            )
        if isinstance(exc, hf_errors.HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else None
            if isinstance(exc, hf_errors.RepositoryNotFoundError) and status not in (401, 403):
                return ModelNotFoundError(
                    f"{self.repo} was not found at {self.endpoint}; fix [model] hf_repo in the profile, or, if the "
                    f"repo is private, set HF_TOKEN to a token with access to {self.repo}"
                    + self._token_note()
                )
            if status in (401, 403):
                return self._auth_error(status, isinstance(exc, hf_errors.RepositoryNotFoundError))
            if status == 404:
                return ModelNotFoundError(f"{where} was not found at {self.endpoint}: {exc}; check [model] in the profile")
            return HubUnreachableError(
                f"the Hugging Face Hub at {self.endpoint} answered HTTP {status} for {where}; try again later"
            )
        if isinstance(exc, hf_errors.OfflineModeIsEnabled):
            return HubUnreachableError(
                f"HF_HUB_OFFLINE is set, and {where} is not complete in the Hugging Face cache at {self.cache}; "
                "unset HF_HUB_OFFLINE to download it"
            )
        if isinstance(exc, hf_errors.LocalEntryNotFoundError) or _is_transport_error(exc):
            return HubUnreachableError(
                f"cannot reach the Hugging Face Hub at {self.endpoint} to fetch {where} ({_short(exc)}); "
                "check the network connection, or set HF_ENDPOINT to a reachable Hub mirror"
            )
        if isinstance(exc, hf_errors.FileMetadataError):
            return DownloadError(
                f"{self.endpoint} does not answer like a Hugging Face Hub for {where} ({_short(exc)}); "
                "check HF_ENDPOINT and any proxy settings"
            )
        if isinstance(exc, OSError):
            return _disk_error(exc, self.cache, where)
        return None

    def _auth_error(self, status: int, repo_not_found: bool) -> HubAuthError:
        source = _token_source(self.token)
        if source is None:
            return HubAuthError(
                f"{self.repo} at {self.endpoint} needs a token (HTTP {status}): set HF_TOKEN to a token with access "
                f"to {self.repo} (or fix [model] hf_repo in the profile if the name is wrong)"
            )
        if status == 401 and not repo_not_found:
            return HubAuthError(
                f"the Hugging Face Hub at {self.endpoint} rejected the token from {source} (HTTP 401): "
                f"set HF_TOKEN to a valid token with access to {self.repo}"
            )
        return HubAuthError(
            f"the token from {source} has no access to {self.repo} at {self.endpoint} (HTTP {status}): "
            f"set HF_TOKEN to a token with access to {self.repo} (or fix [model] hf_repo in the profile)"
        )

    def _token_note(self) -> str:
        source = _token_source(self.token)
        return f" (the token from {source} was sent)" if source else " (no token was sent)"

    def _status_error(self, status: int, filename: str) -> DownloadError:
        if status in (401, 403):
            return self._auth_error(status, False)
        if status == 404:
            return ModelNotFoundError(
                f"{self.endpoint} has no file {filename!r} in {self.repo} at revision {self.revision!r} (HTTP 404); "
                "fix [model] hf_file in the profile"
            )
        return DownloadError(f"downloading {self.repo}/{filename} from {self.endpoint} failed with HTTP {status}")


class _Retryable(Exception):
    """A transfer try failed in a way that another try (resuming) may fix."""


class _Partial:
    """The `.incomplete` file of one blob: its size, and its running sha256 when one is expected."""

    def __init__(self, path: Path, sha256: str | None) -> None:
        self.path = path
        self.expected_sha256 = sha256
        self.resumed = path.exists() and path.stat().st_size > 0
        self._hash: Any = None  # a hashlib sha256 object over the first `_hashed` bytes
        self._hashed = 0
        self._file: BinaryIO | None = None

    @property
    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def open(self) -> int:
        """Open for appending; return how many bytes are there already."""
        self._file = open(self.path, "ab")
        have = self._file.tell()
        if self.expected_sha256 is not None and (self._hash is None or self._hashed != have):
            self._hash, self._hashed = hashlib.sha256(), 0
            with open(self.path, "rb") as existing:
                while block := existing.read(_HASH_BLOCK):
                    self._hash.update(block)
                    self._hashed += len(block)
        return have

    def write(self, chunk: bytes) -> None:
        assert self._file is not None, "write() before open()"
        self._file.write(chunk)
        if self._hash is not None:
            self._hash.update(chunk)
            self._hashed += len(chunk)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def reset(self) -> None:
        """Start from zero."""
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
        else:
            self.path.unlink(missing_ok=True)
        self._hash, self._hashed = (hashlib.sha256() if self.expected_sha256 else None), 0
        self.resumed = False

    def verify(self, size: int | None, what: str) -> None:
        """Raise CorruptDownloadError, deleting the file, unless it has the expected size and sha256."""
        actual = self.size
        if size is not None and actual != size:
            self.path.unlink(missing_ok=True)
            raise CorruptDownloadError(
                f"{what}: received {actual} bytes where the Hub announced {size}; the partial file {self.path} was "
                "deleted, so the next download starts over"
            )
        if self.expected_sha256 is None:
            return
        if self._hash is None or self._hashed != actual:
            self.open()
            self.close()
        digest = self._hash.hexdigest()
        if digest != self.expected_sha256:
            self.path.unlink(missing_ok=True)
            self._hash, self._hashed = None, 0
            raise CorruptDownloadError(
                f"{what}: the bytes received have sha256 {digest}, but the Hub says {self.expected_sha256}; the "
                f"partial file {self.path} was deleted, so the next download starts over"
            )

    def publish(self, blob: Path) -> None:
        """Give the checked file its final name, durably."""
        with open(self.path, "rb") as done:
            os.fsync(done.fileno())
        os.replace(self.path, blob)


# ----- helpers -----


def _file_size(entry: RepoFile) -> int:
    return int(entry.lfs.size if entry.lfs is not None else entry.size)


def _range_starts_at(response: httpx.Response, offset: int) -> bool:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return match is not None and int(match.group(1)) == offset


def _check_room(directory: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DiskFullError(
            f"not enough disk space for {what}: it needs {_size(needed)} more, but {directory} has {_size(free)} free; "
            "free some space, or set HF_HUB_CACHE to a directory on a bigger disk"
        )


def _disk_error(exc: OSError, where: Path, what: str) -> DownloadError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(
            f"the disk holding {where} filled up while downloading {what}; free some space (what arrived is kept "
            "and the next download resumes), or set HF_HUB_CACHE to a directory on a bigger disk"
        )
    return DownloadError(
        f"cannot write to the Hugging Face cache at {where} while downloading {what} ({exc}); fix the directory's "
        "permissions, or set HF_HUB_CACHE to a writable directory"
    )


def _transport_error_types() -> tuple[type[BaseException], ...]:
    """Network error classes of whichever HTTP client this huggingface_hub version uses."""
    found: list[type[BaseException]] = [httpx.TransportError]
    for module, name in (("httpx2", "TransportError"), ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            found.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


_TRANSPORT_ERRORS = _transport_error_types()


def _is_transport_error(exc: BaseException) -> bool:
    return isinstance(exc, _TRANSPORT_ERRORS)


def _token_source(explicit: str | None) -> str | None:
    """Where the token sent comes from, for messages; None when no token is sent."""
    if explicit:
        return "the llmd configuration"
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HF_TOKEN"
    try:
        stored = get_token()
    except Exception:  # a broken OIDC or token-file setup: there is no token to blame
        return None
    return f"the stored login ({constants.HF_TOKEN_PATH})" if stored else None


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "an unknown number of bytes"
    if nbytes >= _GIB:
        return f"{nbytes / _GIB:.1f} GiB"
    return f"{nbytes / _MIB:.1f} MiB"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__

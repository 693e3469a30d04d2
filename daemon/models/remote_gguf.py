"""A Hugging Face GGUF's headers, read from the Hub before the model is downloaded.

`llmctl plan` (and `llmctl profile new --from-hf`) answer "will it fit?" for a model whose
file is not here yet: each part's header is read with HTTP range requests
(`downloads.open_remote_file` through a `range_reader.RangeReader`), a few MB of a multi-GB
file, and the estimator works on it as on the file itself (`gguf_header.HeaderOnlyGguf`).
Nothing enters the Hugging Face cache: `llmctl pull` still downloads the whole file.

The header bytes are kept in `<state_dir>/gguf-headers`, so planning again asks nothing of
the network. Headers read at a commit hash never change. For a branch or tag they are trusted
for `RECHECK_AFTER` (unless the Hugging Face cache has since seen the branch move); after that
one HEAD request checks that the file is still the same before they are used again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name

from llmd.daemon.models.downloads import RemoteFile, hub_cache_dir, open_remote_file, resolve_cached
from llmd.daemon.models.profiles import ModelSource
from llmd.daemon.models.range_reader import RangeReader
from llmd.daemon.placement.estimate import EstimateError
from llmd.daemon.placement.gguf_header import FileHeader, GgufHeaderError, HeaderOnlyGguf, parse_header, split_part_names
from llmd.daemon.util.atomic_write import write_atomic, write_json_atomic
from llmd.daemon.util.state_file import expect, expect_number, read_state

log = logging.getLogger(__name__)

HEADER_CACHE_DIR = "gguf-headers"
# How long headers read at a branch or tag are used without asking the Hub whether it moved.
RECHECK_AFTER = 24 * 3600.0
# Buffer between the header parser's many small reads and the range reader.
_READ_BUFFER = 64 * 1024
_MIB = 1024 * 1024

Progress = Callable[[str], None]


def is_hub_gguf(source: ModelSource) -> bool:
    """Whether `source` is one GGUF file (or the first part of a split one) in a Hub repo."""
    return source.hf_repo is not None and source.hf_file is not None and source.hf_file.lower().endswith(".gguf")


async def headers_before_download(source: ModelSource, state_dir: Path | None,
                                  on_progress: Progress | None = None) -> HeaderOnlyGguf | None:
    """The headers of `source`'s GGUF read from the Hub, when it is a Hub GGUF that is not
    complete in the Hugging Face cache; None when the model is to be read on disk instead.

    Blocking work runs in a worker thread; `on_progress` is called there with a line for people
    as the read goes. Raises DownloadError (naming the endpoint) or EstimateError."""
    if not is_hub_gguf(source):
        return None
    if await anyio.to_thread.run_sync(resolve_cached, source) is not None:
        return None
    return await anyio.to_thread.run_sync(
        lambda: read_hub_gguf(source, state_dir, on_progress=on_progress), abandon_on_cancel=True
    )


def read_hub_gguf(source: ModelSource, state_dir: Path | None, *, on_progress: Progress | None = None,
                  token: str | None = None, endpoint: str | None = None) -> HeaderOnlyGguf:
    """The headers of every part of `source`'s GGUF, from the cache in `state_dir` or the Hub
    (blocking). `token` and `endpoint` default to HF_TOKEN and HF_ENDPOINT, as for downloads."""
    assert source.hf_repo is not None and source.hf_file is not None, "a Hub GGUF source"
    hub = endpoint or constants.ENDPOINT
    cache = _HeaderCache(state_dir / HEADER_CACHE_DIR) if state_dir is not None else None
    names = split_part_names(source.hf_file)
    revision = source.revision or constants.DEFAULT_REVISION
    headers: list[FileHeader] = []
    entries: list[_Entry] = []
    for number, name in enumerate(names, start=1):
        # Every part at the commit the first one was read at, so that the parts belong together.
        at = entries[0].commit if entries else revision
        part = _PartReader(source.hf_repo, name, at, hub, token, cache, on_progress,
                           f" (part {number} of {len(names)})" if len(names) > 1 else "")
        header, entry = part.read()
        headers.append(header)
        entries.append(entry)
    commit = entries[0].commit
    return HeaderOnlyGguf(
        source=f"hf://{source.hf_repo}@{commit}/{source.hf_file}",
        identity=json.dumps([entries[0].endpoint, source.hf_repo, commit, [e.etag for e in entries]]),
        parts=tuple(headers),
    )


@dataclass(frozen=True)
class _Entry:
    """What the cache knows of one file, beside its header bytes."""

    endpoint: str
    repo: str
    revision: str
    filename: str
    commit: str
    etag: str
    size: int | None
    length: int  # header bytes kept
    checked_at: float  # when the Hub last confirmed this is the file at `revision`


class _PartReader:
    """One file's header: from the cache when it is still good, else read from the Hub."""

    def __init__(self, repo: str, filename: str, revision: str, endpoint: str, token: str | None,
                 cache: _HeaderCache | None, on_progress: Progress | None, part: str) -> None:
        self.repo, self.filename, self.revision = repo, filename, revision
        self.endpoint = endpoint.rstrip("/")
        self.token = token
        self.cache = cache
        self.on_progress = on_progress
        self.part = part
        self.key = json.dumps([self.endpoint, repo, revision, filename])

    def read(self) -> tuple[FileHeader, _Entry]:
        kept = self.cache.get(self.key) if self.cache is not None else None
        if kept is not None and self._trusted(kept[0]):
            header = _parse_kept(kept[1])
            if header is not None:
                return header, kept[0]
        self._say(f"reading the GGUF header of {self.repo}/{self.filename}{self.part} from {self.endpoint}")
        with open_remote_file(self.repo, self.filename, self.revision, token=self.token, endpoint=self.endpoint) as remote:
            if kept is not None and (kept[0].commit, kept[0].etag) == (remote.commit, remote.etag):
                header = _parse_kept(kept[1])
                if header is not None:  # the same file as before: its kept header is good
                    entry = _Entry(**{**asdict(kept[0]), "checked_at": time.time()})
                    self._keep(entry, kept[1])
                    return header, entry
            return self._fetch(remote)

    def _fetch(self, remote: RemoteFile) -> tuple[FileHeader, _Entry]:
        started = time.monotonic()
        size = remote.size

        def fetched(total: int) -> None:
            of = f" of the {_mib(size)} file" if size else ""
            self._say(f"reading the GGUF header of {self.repo}/{self.filename}{self.part} from {self.endpoint}: "
                      f"{_mib(total)}{of}")

        reader = RangeReader(remote.read_range, size, on_fetch=fetched)
        try:
            header = parse_header(io.BufferedReader(reader, _READ_BUFFER))
        except GgufHeaderError as exc:
            raise EstimateError(
                f"{self.repo}/{self.filename} at {self.endpoint} is not a readable GGUF file ({exc}); "
                "fix [model] hf_file in the profile"
            ) from None
        log.info("read the GGUF header of %s/%s from %s: %d bytes in %d requests, %.1fs (the file is %s bytes)",
                 self.repo, self.filename, self.endpoint, reader.fetched, reader.requests,
                 time.monotonic() - started, size)
        entry = _Entry(self.endpoint, self.repo, self.revision, self.filename, remote.commit, remote.etag, size,
                       header.length, time.time())
        self._keep(entry, reader.kept(header.length))
        return header, entry

    def _trusted(self, entry: _Entry) -> bool:
        """Whether kept headers may be used without asking the Hub."""
        if entry.revision == entry.commit:
            return True  # read at a commit hash: the file can never change
        seen = _hub_cache_ref(self.repo, self.revision)
        if seen is not None and seen != entry.commit:
            return False  # the Hugging Face cache has seen the branch move since
        return time.time() - entry.checked_at < RECHECK_AFTER

    def _keep(self, entry: _Entry, data: bytes) -> None:
        if self.cache is not None:
            self.cache.put(self.key, entry, data)

    def _say(self, line: str) -> None:
        if self.on_progress is not None:
            self.on_progress(line)


def _parse_kept(data: bytes) -> FileHeader | None:
    """The header in kept bytes; None when they do not hold a whole one (then read it anew)."""
    try:
        return parse_header(io.BytesIO(data))
    except GgufHeaderError:
        return None


def _parse_entry(raw: Any) -> _Entry:
    """A kept header's index, each field checked."""
    expect(raw, dict, "the index")
    strings = {name: expect(raw[name], str, name) for name in ("endpoint", "repo", "revision", "filename", "commit", "etag")}
    size = raw["size"]
    return _Entry(
        **strings,
        size=None if size is None else expect_number(size, "size", integer=True),
        length=expect_number(raw["length"], "length", minimum=1, integer=True),
        checked_at=expect_number(raw["checked_at"], "checked_at"),
    )


class _HeaderCache:
    """Header bytes by file, in `directory`: `<key hash>.bin` and its `_Entry` as `.json`.

    A cache that cannot be written (a state dir owned by the daemon's user, read by llmctl
    run as another) is only skipped: planning works without it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _paths(self, key: str) -> tuple[Path, Path]:
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.directory / f"{name}.json", self.directory / f"{name}.bin"

    def get(self, key: str) -> tuple[_Entry, bytes] | None:
        index, blob = self._paths(key)
        entry = read_state(index, _parse_entry)  # a damaged index is moved aside: read from the Hub again
        if entry is None:
            return None
        try:
            data = blob.read_bytes()
        except OSError:
            return None
        # A different length: a crash between writing the bytes and their index. Not damage.
        return (entry, data) if len(data) == entry.length else None

    def put(self, key: str, entry: _Entry, data: bytes) -> None:
        index, blob = self._paths(key)
        try:
            write_atomic(blob, data)
            write_json_atomic(index, asdict(entry), indent=1)  # written last: it vouches for the bytes
        except OSError as exc:
            log.debug("not keeping the GGUF header of %s/%s in %s: %s", entry.repo, entry.filename, self.directory, exc)


def _hub_cache_ref(repo: str, revision: str) -> str | None:
    """The commit the Hugging Face cache last saw `revision` at, if any tool recorded one."""
    try:
        ref = hub_cache_dir() / repo_folder_name(repo_id=repo, repo_type="model") / "refs" / revision
        return ref.read_text().strip() or None
    except (OSError, ValueError):
        return None


def _mib(nbytes: int | None) -> str:
    if nbytes is None:
        return "?"
    if nbytes >= 1024 * _MIB:
        return f"{nbytes / (1024 * _MIB):.1f} GiB"
    return f"{nbytes / _MIB:.1f} MiB"

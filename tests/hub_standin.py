"""A local stand-in for the Hugging Face Hub's download routes, for tests.

It serves what `hf_hub_download` and `snapshot_download` ask for:

- `HEAD|GET /{owner}/{name}/resolve/{revision}/{path}`: the file, with `X-Repo-Commit`,
  `ETag` (git sha1, or for LFS files `X-Linked-Etag` = sha256 and `X-Linked-Size`),
  `Content-Length`, and `Range: bytes=N-` or `bytes=N-M` answered with 206 Partial Content
  and `Content-Range`;
- `GET /api/models/{owner}/{name}` and `.../revision/{revision}`: repo info (`sha`, `siblings`);
- `GET /api/models/{owner}/{name}/tree/{revision}`: the recursive file listing.

Errors carry the headers the Hub sends (`X-Error-Code: RepoNotFound | RevisionNotFound |
EntryNotFound`), and a private repo answers 401 without `Authorization: Bearer <token>` the
way the Hub does. Hooks cut a transfer after N bytes, corrupt a file, or make GETs of it
ignore `Range:` (as some proxies do); every request is
recorded, and the body bytes served are counted per path (`bytes_served`). Point `huggingface_hub` at `HubStandin.url` with `endpoint=` (or `HF_ENDPOINT` in a
fresh process).
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt")
_BODY_CHUNK = 64 * 1024


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]

    @property
    def range(self) -> str | None:
        return self.headers.get("range")

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class HubFile:
    content: bytes
    lfs: bool

    # Worked out once: a large file is hashed for every request otherwise.
    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @cached_property
    def git_sha1(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1


@dataclass
class HubRepo:
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    private: bool = False

    def commit_for(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


@dataclass
class _Cut:
    nbytes: int
    times: int


class HubStandin:
    """The server. Use as a context manager, or call `start()` and `stop()`."""

    def __init__(self, token: str = "GOOD") -> None:
        self.token = token
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[Request] = []
        self._served: dict[str, int] = {}
        self._cuts: dict[str, _Cut] = {}
        self._corrupt: set[str] = set()
        self._whole: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # ----- content -----

    def add_commit(
        self,
        repo: str,
        files: dict[str, bytes],
        *,
        branch: str | None = "main",
        tags: tuple[str, ...] = (),
        private: bool = False,
    ) -> str:
        """Add a commit holding exactly `files` (LFS for weight-like names); return its hash."""
        hub_repo = self.repos.setdefault(repo, HubRepo())
        hub_repo.private = hub_repo.private or private
        digest = hashlib.sha1(repo.encode())
        digest.update(str(len(hub_repo.commits)).encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + files[path])
        commit = digest.hexdigest()
        hub_repo.commits[commit] = {
            path: HubFile(content, lfs=path.endswith(LFS_SUFFIXES)) for path, content in files.items()
        }
        for ref in ((branch,) if branch else ()) + tags:
            hub_repo.refs[ref] = commit
        return commit

    def file(self, repo: str, path: str, revision: str = "main") -> HubFile:
        hub_repo = self.repos[repo]
        commit = hub_repo.commit_for(revision)
        assert commit is not None
        return hub_repo.commits[commit][path]

    # ----- hooks -----

    def cut_after(self, path: str, nbytes: int, times: int = 1) -> None:
        """The next `times` GETs of `path` (in any repo) stop after `nbytes` body bytes, closing the connection."""
        with self._lock:
            self._cuts[path] = _Cut(nbytes, times)

    def corrupt(self, path: str) -> None:
        """Serve `path` with its first byte changed (headers still describe the real file)."""
        with self._lock:
            self._corrupt.add(path)

    def ignore_ranges(self, path: str) -> None:
        """Answer GETs of `path` with 200 and the whole file, whatever `Range:` asks for."""
        with self._lock:
            self._whole.add(path)

    def gets(self, path_suffix: str) -> list[Request]:
        """Recorded GET requests for a resolve URL ending in `path_suffix`."""
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(path_suffix)]

    def bytes_served(self, path_suffix: str = "") -> int:
        """Body bytes sent (since the last `clear`) for request paths ending in `path_suffix`."""
        with self._lock:
            return sum(n for path, n in self._served.items() if path.endswith(path_suffix))

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self._served.clear()

    # ----- lifecycle -----

    @property
    def url(self) -> str:
        assert self._server is not None, "the stand-in is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def use_in_env(self, monkeypatch: Any, hf_home: Path) -> None:
        """Point huggingface_hub at this stand-in through the environment, so child processes (a
        daemon, llmctl) use it too: no token, an empty cache under `hf_home`."""
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", self.url)
        monkeypatch.setenv("HF_HOME", str(hf_home))
        monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))

    def start(self) -> HubStandin:
        standin = self

        class Handler(_Handler):
            hub = standin

        self._server = _Server(("127.0.0.1", 0), Handler)
        server = self._server
        self._thread = threading.Thread(
            target=lambda: server.serve_forever(poll_interval=0.05), name="hub-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection, so pooled clients cannot reach it either."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._server = None

    def __enter__(self) -> HubStandin:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ----- used by the handler -----

    def _take_cut(self, path: str) -> int | None:
        with self._lock:
            cut = self._cuts.get(path)
            if cut is None or cut.times <= 0:
                return None
            cut.times -= 1
            return cut.nbytes

    def _count(self, path: str, nbytes: int) -> None:
        with self._lock:
            self._served[path] = self._served.get(path, 0) + nbytes

    def _record(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(
                Request(handler.command, handler.path, {k.lower(): v for k, v in handler.headers.items()})
            )


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients that hang up (a cancelled or cut transfer) are normal here; anything else is printed."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<revision>[^/]+)(?P<sub>/.*)?)?$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandin
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    # ----- routing -----

    def _dispatch(self, body: bool) -> None:
        self.hub._record(self)
        path = urlsplit(self.path).path
        if match := _RESOLVE.match(path):
            self._resolve(match["repo"], unquote(match["revision"]), unquote(match["path"]), body)
        elif body and (match := _API.match(path)):
            self._api(match["repo"], match["kind"], unquote(match["revision"] or "main"))
        else:
            self._reply(404, b"not found", {"X-Error-Message": "no such route in the hub stand-in"})

    def _repo(self, name: str) -> HubRepo | None:
        """The repo, or None after answering the error the Hub would send."""
        repo = self.hub.repos.get(name)
        sent = self.headers.get("Authorization")
        if sent is not None and sent != f"Bearer {self.hub.token}":
            self._reply(401, b"", {"X-Error-Message": "Invalid credentials in Authorization header"})
            return None
        if repo is None or (repo.private and sent is None):
            # The Hub hides private repos from anonymous clients as if they did not exist.
            status = 401 if sent is None else 404
            self._reply(status, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            return None
        return repo

    def _repo_at(self, name: str, revision: str) -> tuple[HubRepo, str] | None:
        """The repo and the commit `revision` names, or None after answering the Hub's error."""
        repo = self._repo(name)
        if repo is None:
            return None
        commit = repo.commit_for(revision)
        if commit is None:
            self._reply(404, b"", {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
            return None
        return repo, commit

    def _resolve(self, name: str, revision: str, path: str, body: bool) -> None:
        found = self._repo_at(name, revision)
        if found is None:
            return
        repo, commit = found
        hub_file = repo.commits[commit].get(path)
        if hub_file is None:
            self._reply(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit,
                                   "X-Error-Message": "Entry not found"})
            return
        content = hub_file.content
        if path in self.hub._corrupt and content:
            content = bytes([content[0] ^ 0xFF]) + content[1:]
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if hub_file.lfs:
            headers["ETag"] = f'"{hub_file.sha256}"'
            headers["X-Linked-Etag"] = f'"{hub_file.sha256}"'
            headers["X-Linked-Size"] = str(len(content))
        else:
            headers["ETag"] = f'"{hub_file.git_sha1}"'
        status, start, end = 200, 0, len(content)
        requested = self.headers.get("Range")
        if path in self.hub._whole:
            requested = None
        if requested and (match := _RANGE.match(requested.strip())):
            start = int(match[1])
            end = min(int(match[2]) + 1, len(content)) if match[2] else len(content)
            if start >= len(content):
                self._reply(416, b"", {**headers, "Content-Range": f"bytes */{len(content)}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(content)}"
        if not body:
            self._reply(status, b"", headers, length=end - start)
            return
        cut = self.hub._take_cut(path)
        self._reply(status, content[start:end], headers, cut=cut)

    def _api(self, name: str, kind: str | None, revision: str) -> None:
        found = self._repo_at(name, revision)
        if found is None:
            return
        repo, commit = found
        files = repo.commits[commit]
        if kind == "tree":
            entries: list[dict[str, object]] = []
            folders = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
            for folder in folders:
                entries.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0,
                                "path": folder})
            for path, hub_file in sorted(files.items()):
                entry: dict[str, object] = {"type": "file", "oid": hub_file.git_sha1, "size": len(hub_file.content),
                                            "path": path}
                if hub_file.lfs:
                    entry["lfs"] = {"oid": hub_file.sha256, "size": len(hub_file.content), "pointerSize": 134}
                entries.append(entry)
            payload: object = entries
        else:
            payload = {
                "id": name, "modelId": name, "sha": commit, "private": repo.private,
                "siblings": [{"rfilename": path} for path in sorted(files)],
            }
        self._reply(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    # ----- writing -----

    def _reply(
        self, status: int, data: bytes, headers: dict[str, str], *, length: int | None = None, cut: int | None = None
    ) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        if self.command == "HEAD":
            return
        limit = len(data) if cut is None else min(cut, len(data))
        path = urlsplit(self.path).path
        try:
            for offset in range(0, limit, _BODY_CHUNK):
                chunk = data[offset:min(offset + _BODY_CHUNK, limit)]
                self.wfile.write(chunk)
                self.hub._count(path, len(chunk))
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            return
        if cut is not None:
            # Drop the connection mid-body, as a network failure would.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

"""The management API that `llmctl` speaks, served only on the unix socket."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from llmd.daemon.diagnostics.bench_store import bench_headline, write_bench
from llmd.daemon.errors import LlmdError, UnknownModelError
from llmd.daemon.http.request_log import RequestLog
from llmd.daemon.util.log_lines import DEFAULT_LOG_LINES, LOG_ABSENT_HEADER, MAX_LOG_LINES
from llmd.daemon.util.log_tail import read_tail
from llmd.daemon.util.rotating_log import LogFollower, rotated
from llmd.daemon.manager.core import Manager
from llmd.daemon.manager.state import Job, Load, State
from llmd.daemon.manager.reload import reload_profiles
from llmd.daemon.util.shutdown import Shutdown

PROGRESS_SECONDS = 0.5
FOLLOW_POLL_SECONDS = 0.25


# States in which a model holds an engine (or is getting one): one that `--replace` replaces.
_HOLDING = (State.READY, State.STARTING, State.SLEEPING)


@dataclass(frozen=True)
class _LoadStart:
    """A model as a load request found it: its last load, whether it was ready already, and the
    running model the request replaces."""

    load: Load | None
    ready: bool
    replaces: str | None

    def outcome(self, load: Load | None) -> dict[str, Any]:
        """What the request did, for `llmctl load` to say: nothing (the model was running), or
        which models it stopped or put to sleep to make room, and which it replaced."""
        new = load if load is not None and load is not self.load else None
        return {
            "already_running": self.ready and new is None,
            "evicted": list(new.evicted) if new else [],
            "parked": list(new.parked) if new else [],
            "replaced": self.replaces,
        }


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _ndjson(event: dict[str, Any]) -> bytes:
    return (json.dumps(event) + "\n").encode()


async def _while_running(job: Job) -> AsyncIterator[None]:
    """A tick every PROGRESS_SECONDS while `job` runs, for a progress event; ends as soon as
    the job is done, without a last tick."""
    while not job.done.is_set():
        with anyio.move_on_after(PROGRESS_SECONDS):
            await job.done.wait()
        if not job.done.is_set():
            yield


class ManagementApi:
    def __init__(self, manager: Manager, requests: RequestLog, shutdown: Shutdown | None = None,
                 config_path: Path | None = None) -> None:
        self.manager = manager
        self.requests = requests
        self._shutdown = shutdown
        # The llmd.toml the daemon read (None: the defaults), for `GET /v1/status`.
        self.config_path = config_path

    def _model(self, request: Request) -> str:
        name = request.path_params["name"]
        return self.manager.resolve(name).name

    async def ps(self, request: Request) -> Response:
        return JSONResponse({"models": self.manager.status()})

    async def status(self, request: Request) -> Response:
        """Who this daemon is and where to reach it: `llmctl status`."""
        from llmd.daemon.web.status_report import daemon_status

        return JSONResponse(daemon_status(self.manager, self.config_path))

    async def profiles(self, request: Request) -> Response:
        found = self.manager.profiles
        rows = [
            {
                "name": name,
                "engine": profile.engine,
                # A kept profile's file is invalid: its model runs on the last good version.
                "valid": name not in found.kept,
                "aliases": profile.aliases,
                "model": str(profile.model.path or profile.model.hf_repo),
                "ttl": profile.policy.ttl,
                # Tokens each request may fill, and requests the engine serves at once.
                "ctx": profile.launch.ctx,
                "parallel": profile.launch.parallel,
                "state": self.manager.instances[name].state.value if name in self.manager.instances else "stopped",
                "source": str(found.sources[name]),
                "error": found.errors.get(name) if name in found.kept else None,
                "bench": bench_headline(self.manager.config.server.state_dir, name),
            }
            for name, profile in found.profiles.items()
        ]
        rows += [
            {"name": name, "engine": None, "valid": False, "aliases": [], "model": None, "ttl": None,
             "ctx": None, "parallel": None, "state": None, "source": str(found.sources[name]), "error": error, "bench": None}
            for name, error in found.errors.items()
            if name not in found.kept
        ]
        return JSONResponse({"profiles": sorted(rows, key=lambda row: row["name"])})

    async def load(self, request: Request) -> Response:
        """Stream NDJSON progress until the model is ready or its load failed.

        With `?replace=OLD`, OLD is swapped out for the model. The load goes on even if the
        client disconnects: others may be waiting for the same model.
        """
        name = self._model(request)
        old = request.query_params.get("replace")
        if old is not None:
            old = self.manager.resolve(old).name
        inst = self.manager.instance(name)
        # What was so before the job starts, for the ready event's `outcome`.
        before = _LoadStart(
            load=inst.load,
            ready=inst.state is State.READY and old in (None, name),
            replaces=old if old not in (None, name) and self.manager.instance(old).state in _HOLDING else None,
        )
        if old is not None:
            job = self.manager.run_job(self.manager.replace, name, old)
        else:
            job = self.manager.run_job(self.manager.ensure_ready, name)

        async def events() -> AsyncIterator[bytes]:
            started = time.monotonic()
            async for _ in _while_running(job):
                message, last_line = self.manager.load_report(inst)
                yield _ndjson({
                    "event": "progress",
                    "model": name,
                    "elapsed_s": round(time.monotonic() - started, 1),
                    "message": message,
                    "log": last_line,
                })
            if job.error is not None:
                yield _ndjson({"event": "error", "model": name, "message": str(job.error)})
                return
            row = next(r for r in self.manager.status() if r["model"] == name)
            yield _ndjson({"event": "ready", "model": name, "status": row, "outcome": before.outcome(inst.load)})

        return StreamingResponse(events(), media_type="application/x-ndjson")

    async def pull(self, request: Request) -> Response:
        """Stream NDJSON download progress until the model's files are complete."""
        try:
            name = self._model(request)
        except UnknownModelError as exc:
            wanted = request.path_params["name"]
            if wanted in self.manager.profiles.errors:
                raise
            # `pull` takes a profile's name, not a repo: say how a Hub model gets one.
            return _error(404, f"{exc}. To download a model from Hugging Face, write a profile for it first: "
                               f"`llmctl profile new {wanted} --from-hf OWNER/REPO`, then `llmctl pull {wanted}`")
        job = self.manager.run_job(self.manager.pull, name)
        inst = self.manager.instance(name)

        async def events() -> AsyncIterator[bytes]:
            async for _ in _while_running(job):
                yield _ndjson({"event": "progress", "model": name, "message": inst.progress})
            if job.error is not None:
                yield _ndjson({"event": "error", "model": name, "message": str(job.error)})
            else:
                yield _ndjson({"event": "done", "model": name})

        return StreamingResponse(events(), media_type="application/x-ndjson")

    async def plan(self, request: Request) -> Response:
        """What loading the model now would do, as JSON (422 with the reason when no plan can
        be made). With `?progress=1`, NDJSON instead, as planning can take a while when it
        reads a model's header from the Hub: a progress event every half second (`message`:
        how far it got, "" until there is news), then `{"event": "plan", "plan": ...}` or
        `{"event": "error", "message": ...}`."""
        name = self._model(request)
        if request.query_params.get("progress") not in ("1", "true", "yes"):
            try:
                return JSONResponse(await self.manager.plan_preview(name))
            except LlmdError as exc:
                return _error(422, str(exc))
        news = _LastLine()
        made: dict[str, Any] = {}

        async def preview() -> None:
            try:
                made["plan"] = await self.manager.plan_preview(name, news)
            except LlmdError:
                raise
            except Exception as exc:  # a job's unexpected error must not reach the manager's task group
                raise LlmdError(f"planning {name} failed: {type(exc).__name__}: {exc}") from exc

        job = self.manager.run_job(preview)

        async def events() -> AsyncIterator[bytes]:
            async for _ in _while_running(job):
                yield _ndjson({"event": "progress", "model": name, "message": news.text})
            if job.error is not None or "plan" not in made:
                yield _ndjson({"event": "error", "model": name, "message": str(job.error or "planning was cancelled")})
            else:
                yield _ndjson({"event": "plan", "model": name, "plan": made["plan"]})

        return StreamingResponse(events(), media_type="application/x-ndjson")

    async def reload(self, request: Request) -> Response:
        """Re-read the profiles as SIGHUP does (llmd.toml itself is re-read only on SIGHUP)."""
        profiles, changes = reload_profiles(self.manager, self.manager.config)
        return JSONResponse({
            "profiles": sorted(profiles.profiles),
            "invalid": dict(sorted(profiles.errors.items())),
            "changes": changes,
        })

    async def store_bench(self, request: Request) -> Response:
        """Keep a `llmctl bench` result with the profile, for `ls` (its `headline`) and the dashboard."""
        name = self._model(request)
        try:
            result = await request.json()
        except ValueError:
            return _error(400, "the body must be a JSON object: the bench result")
        if not isinstance(result, dict):
            return _error(400, "the body must be a JSON object: the bench result")
        missing = [key for key in ("headline", "measured_at", "engine", "rows") if key not in result]
        if missing:
            return _error(400, f"the bench result lacks {', '.join(missing)}; `llmctl bench` sends all of them")
        if not isinstance(result["headline"], str) or not isinstance(result["rows"], list):
            return _error(400, "the bench result's headline must be a string and its rows a list")
        path = write_bench(self.manager.config.server.state_dir, name, result)
        return JSONResponse({"model": name, "path": str(path)})

    async def recent_requests(self, request: Request) -> Response:
        """The request log, newest first; `?limit=N` the newest N. With `?follow=1`, NDJSON instead:
        the newest `limit` records (all kept, without a limit) oldest first, then each new one as
        its request finishes."""
        try:
            limit = int(request.query_params["limit"]) if "limit" in request.query_params else None
        except ValueError:
            return _error(400, "limit must be a whole number")
        if limit is not None and limit < 0:
            return _error(400, f"limit must be 0 or more (how many of the newest requests to send), not {limit}")
        log = self.requests
        if request.query_params.get("follow") not in ("1", "true", "yes"):
            return JSONResponse({
                "requests": [record.to_json() for record in log.newest(limit)],
                "kept": log.size,
                "bodies": log.keep_bodies,
            })

        async def stream() -> AsyncIterator[bytes]:
            backlog = log.newest(limit)
            last = backlog[0].id if backlog else log.last_id()
            for record in reversed(backlog):
                yield _ndjson(record.to_json())
            while True:
                await anyio.sleep(FOLLOW_POLL_SECONDS)
                for record in log.after(last):
                    last = record.id
                    yield _ndjson(record.to_json())

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    async def shutdown(self, request: Request) -> Response:
        """Stop the daemon as SIGTERM does, once this answer is sent; refused (409) under systemd.

        The answer has the daemon's `pid` and `within_s`, how long stopping may take, so that
        `llmctl shutdown` can wait for the process to end."""
        assert self._shutdown is not None  # the route exists only with one
        refusal = self._shutdown.refusal()
        if refusal is not None:
            return _error(409, refusal)
        # A background task runs after the answer went out: the caller learns the stop began.
        return JSONResponse({"stopping": True, "pid": os.getpid(), "within_s": self._shutdown.within_s},
                            background=BackgroundTask(self._shutdown.begin, "llmctl shutdown"))

    async def gpus(self, request: Request) -> Response:
        return JSONResponse(self.manager.gpu_report())

    async def unload(self, request: Request) -> Response:
        name = self._model(request)
        stopped = await self.manager.unload(name)
        return JSONResponse({"model": name, "unloaded": stopped})

    async def unload_all(self, request: Request) -> Response:
        running = [row["model"] for row in self.manager.status() if row["state"] in ("ready", "starting", "sleeping")]
        await self.manager.stop_all()
        return JSONResponse({"unloaded": running})

    async def logs(self, request: Request) -> Response:
        name = self._model(request)
        try:
            lines = int(request.query_params.get("lines", DEFAULT_LOG_LINES))
        except ValueError:
            return _error(400, "lines must be a whole number")
        if lines < 0:
            return _error(400, f"lines must be 0 or more (how many lines from the end of the log to send), not {lines}")
        lines = min(lines, MAX_LOG_LINES)  # more than the limit gets the limit
        follow = request.query_params.get("follow") in ("1", "true", "yes")
        path = self.manager.log_path(name)
        headers: dict[str, str] = {}
        try:
            # The tail and where following goes on come from one read: no line is lost or sent twice.
            tail, position = read_tail(path, lines)
            tail = _with_rotated_lines(path, tail, lines)
        except FileNotFoundError:
            never_ran = f"{name!r} has not run yet: it has no engine log ({path}); `llmctl load {name}` starts it"
            if not follow:
                return _error(404, never_ran)
            tail, position = b"", 0
            headers[LOG_ABSENT_HEADER] = "1"  # llmctl says so, then waits for the log
        if tail and not follow and not tail.endswith(b"\n"):
            tail += b"\n"

        async def stream() -> AsyncIterator[bytes]:
            nonlocal position
            if tail:
                yield tail
            if not follow:
                return
            # Across the log's rotations (the rest of the old file, then the new one), as `tail -F`.
            follower = LogFollower(path, position)
            try:
                while True:
                    await anyio.sleep(FOLLOW_POLL_SECONDS)
                    while data := follower.read_new():
                        yield data
            finally:
                follower.close()

        return StreamingResponse(stream(), media_type="text/plain; charset=utf-8", headers=headers)


class _LastLine:
    """The latest progress line of a job, set from any thread (one assignment: atomic)."""

    text = ""

    def __call__(self, line: str) -> None:
        self.text = line


def _with_rotated_lines(path: Path, tail: bytes, lines: int) -> bytes:
    """`tail` (the end of the log at `path`) with the lines before it from the rotated files
    (LOG.1, LOG.2, ...), up to `lines` in all: a log rotated lately holds only its newest lines."""
    number = 1
    while lines and (shown := tail.count(b"\n") + (0 if tail.endswith(b"\n") or not tail else 1)) < lines:
        older = rotated(path, number)
        try:
            before, _ = read_tail(older, lines - shown)
        except FileNotFoundError:
            break
        tail = before + tail
        number += 1
    return tail


async def _unknown_model(request: Request, exc: Exception) -> Response:
    return _error(404, str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")


def build_api_app(manager: Manager, requests: RequestLog | None = None, playground: ASGIApp | None = None,
                  shutdown: Shutdown | None = None, config_path: Path | None = None) -> Starlette:
    """The management API; `requests` is the proxy's request log (none kept without one),
    `playground` the proxy app the dashboard's playground talks to (no playground without one),
    `shutdown` how the daemon stops when asked (no POST /v1/shutdown without one), and
    `config_path` the llmd.toml the daemon read (for `GET /v1/status`)."""
    from starlette.middleware import Middleware

    from llmd.daemon.web.dashboard import dashboard_routes
    from llmd.daemon.web.dashboard_auth import RefuseCrossSite

    requests = requests if requests is not None else RequestLog(0)
    api = ManagementApi(manager, requests, shutdown, config_path)
    routes = [
        Route("/v1/status", api.status, methods=["GET"]),
        Route("/v1/ps", api.ps, methods=["GET"]),
        Route("/v1/profiles", api.profiles, methods=["GET"]),
        Route("/v1/models/{name}/load", api.load, methods=["POST"]),
        Route("/v1/models/{name}/plan", api.plan, methods=["GET"]),
        Route("/v1/models/{name}/pull", api.pull, methods=["POST"]),
        Route("/v1/gpus", api.gpus, methods=["GET"]),
        Route("/v1/models/{name}/unload", api.unload, methods=["POST"]),
        Route("/v1/models/{name}/logs", api.logs, methods=["GET"]),
        Route("/v1/unload", api.unload_all, methods=["POST"]),
        Route("/v1/models/{name}/bench", api.store_bench, methods=["POST"]),
        Route("/v1/reload", api.reload, methods=["POST"]),
        Route("/v1/requests", api.recent_requests, methods=["GET"]),
        *manager.metrics.routes(),
    ]
    if shutdown is not None:
        routes.append(Route("/v1/shutdown", api.shutdown, methods=["POST"]))
    if manager.config.dashboard.enabled:
        routes += dashboard_routes(manager, requests, playground)
    handlers = {UnknownModelError: _unknown_model, HTTPException: _http_error}
    # Browsers may reach this API (the dashboard): a POST forged by another site's page is refused.
    return Starlette(routes=routes, exception_handlers=handlers, middleware=[Middleware(RefuseCrossSite)])

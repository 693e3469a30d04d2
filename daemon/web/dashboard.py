"""The dashboard: one server-rendered page on the management API, at /dashboard.

It shows the GPUs (memory bars with a segment per model), the profiles with their states and
last bench result, and a model's live log; its buttons call the management routes themselves
(`POST /v1/models/NAME/load`, `.../unload`, `GET .../logs?follow=1`). The page's script only
swaps in `/dashboard/status`, the same HTML fragment re-rendered, so all rendering lives in
the templates. Two more pages share its header: the playground (`/dashboard/playground`, see
playground.py), and the request log (`/dashboard/requests`, rows swapped in from
`/dashboard/requests/rows` the same way). Who may see them is decided by the listener: the unix
socket's permissions, or the management token (dashboard_auth.py) on TCP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jinja2
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from llmd.daemon.diagnostics.bench_store import HeadlineCache
from llmd.daemon.web.dashboard_auth import (
    DASHBOARD_PATH,
    LOGIN_GATE,
    LOGIN_PATH,
    LoginGate,
    cookie_session,
    is_tls,
    login_cookie,
    logout_cookie,
)
from llmd.daemon.http.request_log import RequestLog
from llmd.daemon.manager.core import Manager
from llmd.daemon.placement.telemetry import has_readings, telemetry_text
from llmd.daemon.util.request_cells import COLUMNS, full_time, request_cells
from llmd.daemon.util.units import format_mib
from llmd.daemon.web.playground import PlaygroundChat

FILES = Path(__file__).parent / "dashboard_files"
# A pasted token is at most a few hundred bytes; anything longer is not a login.
MAX_LOGIN_BYTES = 4096
TOKEN_SETTING = "[server] management_token"
# Every file the page loads; nothing else under dashboard_files/ is served.
_STATIC = {
    "dashboard.css": "text/css; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "requests.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# The page runs only its own script and stylesheet, talks only to this server and cannot be
# framed by another site (which could trick a click on its buttons).
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    # Not "no-referrer": under it Chromium sends `Origin: null` with the page's own forms, which then
    # cannot be told from forged ones.
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(FILES / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_templates.filters["mib"] = format_mib


def _percent(part: float, whole: float) -> float:
    return round(100 * max(0.0, part) / whole, 2) if whole > 0 else 0.0


def gpu_views(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each card of `Manager.gpu_report()` as a bar: a segment per model, one for other programs,
    the rest free; with its telemetry as text (None for a card that gives no reading at all)."""
    cards = []
    for gpu in report["gpus"]:
        total = gpu["total_mib"]
        segments, offset = [], 0.0
        pieces = [(claim["model"], claim["vram_mib"], claim["state"]) for claim in gpu["models"]]
        if gpu["foreign_mib"] > 0:
            pieces.append((None, gpu["foreign_mib"], "other"))
        for model, mib, state in pieces:
            # Estimates and measurements can overshoot a card a little; the bar never does.
            width = min(_percent(mib, total), 100.0 - offset)
            segments.append({"model": model, "mib": mib, "state": state, "x": offset, "width": width})
            offset += width
        # A card with some readings shows them all, "n/a" for the missing; one with none (a
        # simulated card without telemetry) shows no telemetry line at all.
        readings = telemetry_text(gpu) if has_readings(gpu) else None
        cards.append({**gpu, "segments": segments, "used_percent": _percent(gpu["used_mib"], total), "readings": readings})
    return cards


def profile_views(manager: Manager, headlines: HeadlineCache) -> list[dict[str, Any]]:
    """Every profile, valid or not, with its model's state as `llmctl ps` reports it and its
    last bench headline."""
    running = {row["model"]: row for row in manager.status()}
    found = manager.profiles
    state_dir = manager.config.server.state_dir
    rows = []
    for name, profile in found.profiles.items():
        row = running.get(name, {})
        rows.append({
            "name": name,
            "engine": profile.engine,
            "aliases": profile.aliases,
            "state": row.get("state", "stopped"),
            "progress": row.get("progress"),
            "error": row.get("error"),
            "gpus": row.get("gpus", []),
            "vram_mib": row.get("vram_mib", 0),
            "bench": headlines.headline(state_dir, name),
            "invalid": None,
        })
    for name, error in found.errors.items():
        rows.append({"name": name, "engine": None, "aliases": [], "state": "invalid", "progress": None,
                     "error": None, "gpus": [], "vram_mib": 0, "bench": None, "invalid": error})
    return sorted(rows, key=lambda row: row["name"])


def request_views(requests: RequestLog) -> list[dict[str, Any]]:
    """The request log, newest first, as the requests page's rows."""
    rows = []
    for record in requests.newest():
        fields = record.to_json()
        rows.append({
            "id": record.id,
            "status": record.status,
            "cells": request_cells(fields),
            "full_time": full_time(fields),
            "request_body": record.request_body,
            "response_body": record.response_body,
        })
    return rows


def _html(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    body = _templates.get_template(template).render(**context)
    return HTMLResponse(body, status_code=status_code, headers=_HEADERS)


class Dashboard:
    def __init__(self, manager: Manager, requests: RequestLog, playground: bool) -> None:
        self.manager = manager
        self.requests = requests
        self.playground = playground  # whether the playground page is served
        # The page polls its status every 1.5 s: read each bench result again only once it changed.
        self.headlines = HeadlineCache()

    def _status_context(self) -> dict[str, Any]:
        report = self.manager.gpu_report()
        return {"gpus": gpu_views(report), "note": report["note"], "profiles": profile_views(self.manager, self.headlines)}

    async def page(self, request: Request) -> Response:
        return _html("dashboard.html", **self._page_context(request, "status"), **self._status_context())

    def _page_context(self, request: Request, page: str) -> dict[str, Any]:
        """What every page's header needs: which page it is, and what it may link to."""
        signed_in = LOGIN_GATE in request.scope  # a login cookie, which "log out" can end
        return {"page": page, "signed_in": signed_in, "playground": self.playground}

    async def playground_page(self, request: Request) -> Response:
        models = [row for row in profile_views(self.manager, self.headlines) if row["invalid"] is None]
        return _html("playground.html", models=models, **self._page_context(request, "playground"))

    async def requests_page(self, request: Request) -> Response:
        return _html(
            "requests.html", kept=self.requests.size, bodies=self.requests.keep_bodies, columns=COLUMNS,
            rows=request_views(self.requests), **self._page_context(request, "requests"),
        )

    async def request_rows(self, request: Request) -> Response:
        return _html("request_rows.html", columns=COLUMNS, rows=request_views(self.requests))

    async def status(self, request: Request) -> Response:
        return _html("status.html", **self._status_context())

    async def login_form(self, request: Request) -> Response:
        if LOGIN_GATE not in request.scope:
            return RedirectResponse(DASHBOARD_PATH, status_code=303)  # this listener needs no login
        message = None
        if request.query_params.get("expired"):
            message = "Your login has ended (it expired, you logged out, or llmd restarted). Paste the token again."
        return _html("login.html", message=message, setting=TOKEN_SETTING)

    async def login(self, request: Request) -> Response:
        gate: LoginGate | None = request.scope.get(LOGIN_GATE)
        if gate is None:
            return RedirectResponse(DASHBOARD_PATH, status_code=303)
        # Behind a TLS proxy on loopback, the browser's address from X-Forwarded-For.
        address = request.client.host if request.client else "unknown"
        wait = gate.throttle.retry_after(address)
        if wait is not None:
            # Not even compared: guessing goes no faster by sending more.
            refused = _html("login.html", status_code=429, setting=TOKEN_SETTING, message=(
                f"Too many wrong tokens were sent; try again in {wait} s. (Clients that send the token as "
                f"a Bearer header are not affected.)"
            ))
            refused.headers["Retry-After"] = str(wait)
            return refused
        token, problem = await _pasted_token(request)
        if problem is None and token is not None and not gate.token_matches(token.encode()):
            gate.throttle.failed(address)
            problem = f"That token was not accepted. Paste the value of {TOKEN_SETTING} from the daemon's llmd.toml."
        if problem is not None:
            return _html("login.html", status_code=401 if token else 400, message=problem, setting=TOKEN_SETTING)
        gate.throttle.succeeded(address)
        response = RedirectResponse(DASHBOARD_PATH, status_code=303)
        # The browser may keep the cookie as long as the login can last; the daemon ends it sooner
        # when it goes unused.
        cookie = login_cookie(gate.sessions.create(), is_tls(request.scope), int(gate.sessions.lifetime))
        response.headers["Set-Cookie"] = cookie
        return response

    async def logout(self, request: Request) -> Response:
        gate: LoginGate | None = request.scope.get(LOGIN_GATE)
        secure = is_tls(request.scope)
        session = cookie_session(request.headers, secure)
        if gate is not None and session is not None:
            gate.sessions.revoke(session)  # the cookie, sent again, is refused
        response = RedirectResponse(LOGIN_PATH, status_code=303)
        response.headers["Set-Cookie"] = logout_cookie(secure)
        return response

    async def static(self, request: Request) -> Response:
        name = request.path_params["file"]
        media_type = _STATIC.get(name)
        if media_type is None:
            return JSONResponse({"error": f"no dashboard file {name!r}; the page uses {', '.join(sorted(_STATIC))}"}, 404)
        return FileResponse(FILES / "static" / name, media_type=media_type, headers={"X-Content-Type-Options": "nosniff"})


async def _pasted_token(request: Request) -> tuple[str | None, str | None]:
    """The token from the login form, or what is wrong with the form."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return None, "Send the login form as application/x-www-form-urlencoded with a field named token."
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOGIN_BYTES:
            return None, f"The login form is larger than {MAX_LOGIN_BYTES} bytes; paste only the token."
    values = parse_qs(body.decode("utf-8", "replace")).get("token", [])
    token = values[0].strip() if values else ""
    if not token:
        return None, f"Paste the management token: the value of {TOKEN_SETTING} in the daemon's llmd.toml."
    return token, None


def dashboard_routes(manager: Manager, requests: RequestLog, playground: ASGIApp | None = None) -> list[Route]:
    """The dashboard's routes, to be mounted on the management API; the playground's only with
    `playground`, the proxy app its chats go to."""
    dashboard = Dashboard(manager, requests, playground is not None)
    routes = [
        Route(DASHBOARD_PATH, dashboard.page, methods=["GET"]),
        Route(DASHBOARD_PATH + "/status", dashboard.status, methods=["GET"]),
        Route(LOGIN_PATH, dashboard.login_form, methods=["GET"]),
        Route(LOGIN_PATH, dashboard.login, methods=["POST"]),
        Route(DASHBOARD_PATH + "/logout", dashboard.logout, methods=["POST"]),
        Route(DASHBOARD_PATH + "/static/{file}", dashboard.static, methods=["GET"]),
        Route(DASHBOARD_PATH + "/requests", dashboard.requests_page, methods=["GET"]),
        Route(DASHBOARD_PATH + "/requests/rows", dashboard.request_rows, methods=["GET"]),
    ]
    if playground is not None:
        routes += [
            Route(DASHBOARD_PATH + "/playground", dashboard.playground_page, methods=["GET"]),
            Route(DASHBOARD_PATH + "/playground/chat", PlaygroundChat(playground), methods=["POST"]),
        ]
    return routes

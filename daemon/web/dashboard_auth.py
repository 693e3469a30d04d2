"""How a browser may use the management API: a login cookie in place of the Bearer header, and no
requests forged by other sites.

A browser cannot attach `Authorization: Bearer TOKEN` to a page it navigates to, so the
dashboard's login page trades the management token for a session: a random id that the daemon
keeps in memory (dashboard_sessions.py), in an HttpOnly, SameSite=Strict cookie. The browser
never stores the token itself, the cookie cannot be replayed as a Bearer token against the
management API, and a login ends when it expires, at *Log out* or at a restart. The login page
stops comparing tokens from an address that sent too many wrong ones (login_throttle.py).

Cookies are sent by the browser on its own, which is what cross-site request forgery abuses: a
state-changing request that a browser makes must therefore come from a page of this server (its
`Origin` matches the `Host` it was sent to).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from llmd.daemon.http.proxy import BearerAuth
from llmd.daemon.web.dashboard_sessions import SessionStore
from llmd.daemon.web.login_throttle import LoginThrottle

# The cookie's name over plain HTTP. Behind TLS it is `__Host-` prefixed: browsers then keep it
# only if it is Secure, for this host alone (no Domain) and for Path=/, so no other host or page
# can set one in its place. Browsers refuse a Secure cookie over plain HTTP, hence two names.
COOKIE = "llmd_session"
SECURE_COOKIE = "__Host-" + COOKIE
LOGIN_PATH = "/dashboard/login"
DASHBOARD_PATH = "/dashboard"
# Reachable without credentials: the login form, and the stylesheet it uses.
_PUBLIC = (LOGIN_PATH, "/dashboard/static/")
# The scope key under which the login page finds the LoginGate. Absent where no token is needed
# (the unix socket: its file permissions are the access control).
LOGIN_GATE = "llmd.login_gate"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

TokenCheck = Callable[[bytes], bool]


@dataclass(frozen=True)
class LoginGate:
    """What the login and logout pages need: how to check a pasted token, the logins, and the
    count of failed ones."""

    token_matches: TokenCheck
    sessions: SessionStore
    throttle: LoginThrottle


def is_tls(scope: Scope) -> bool:
    """Whether the browser reached llmd over HTTPS: directly, or through a TLS proxy on loopback
    that says so in X-Forwarded-Proto (uvicorn trusts that header from loopback only)."""
    return scope.get("scheme") == "https"


def cookie_name(secure: bool) -> str:
    return SECURE_COOKIE if secure else COOKIE


def login_cookie(session: str, secure: bool, max_age: int) -> str:
    """The Set-Cookie value that logs a browser in with `session`, for `max_age` seconds."""
    attributes = [f"{cookie_name(secure)}={session}", "Path=/", f"Max-Age={max_age}", "HttpOnly", "SameSite=Strict"]
    if secure:
        attributes.append("Secure")
    return "; ".join(attributes)


def logout_cookie(secure: bool) -> str:
    """The Set-Cookie value that removes the login cookie (its name and attributes must match)."""
    return login_cookie("", secure, 0)


def cookie_session(headers: Headers, secure: bool = False) -> str | None:
    """The value of the login cookie for this scheme, or None without one."""
    wanted = cookie_name(secure)
    for header in headers.getlist("cookie"):
        for pair in header.split(";"):
            name, sep, value = pair.strip().partition("=")
            if sep and name == wanted and value:
                return value
    return None


def cross_site_problem(headers: Headers, *, origin_required: bool) -> str | None:
    """Why a state-changing request must be refused as coming from another site, or None.

    Browsers send `Origin` with every POST; other clients (llmctl, curl) send none, so a missing
    Origin is only a problem where the request relies on the cookie, which only a browser sends.
    """
    origin = headers.get("origin")
    if origin is None:
        if origin_required:
            return "refused: a request signed in by the dashboard's cookie must carry an Origin header; use the dashboard page"
        return None
    host = headers.get("host", "")
    if urlsplit(origin).netloc.lower() != host.lower() or headers.get("sec-fetch-site") == "cross-site":
        return (
            f"refused a cross-site request from {origin} to {host}: load and unload models from the dashboard "
            f"itself (a reverse proxy in front of llmd must pass the Host header through unchanged)"
        )
    return None


def _refuse(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"})


class RefuseCrossSite:
    """ASGI middleware for the whole management API: a state-changing request that a browser sends
    from a page of another site never reaches `app`, on either listener."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in _SAFE_METHODS:
            problem = cross_site_problem(Headers(scope=scope), origin_required=False)
            if problem is not None:
                await _refuse(problem, 403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class DashboardAuth:
    """ASGI middleware around the management API's BearerAuth: also admits the dashboard's login
    cookie, lets anyone reach the login page, and sends a browser without a login there."""

    def __init__(self, bearer: BearerAuth, sessions: SessionStore, throttle: LoginThrottle | None = None) -> None:
        self.bearer = bearer
        self.gate = LoginGate(bearer.matches, sessions, throttle or LoginThrottle())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        # The Bearer header, when sent, is the whole story: clients that send it are not browsers.
        if scope["type"] != "http" or "authorization" in headers:
            await self.bearer(scope, receive, send)
            return
        path: str = scope["path"]
        inner = {**scope, LOGIN_GATE: self.gate}
        if path == LOGIN_PATH or path.startswith(_PUBLIC[1]):
            await self.bearer.app(inner, receive, send)
            return
        token = cookie_session(headers, is_tls(scope))
        if token is not None and self.gate.sessions.check(token):
            if scope["method"] not in _SAFE_METHODS:
                problem = cross_site_problem(headers, origin_required=True)
                if problem is not None:
                    await _refuse(problem, 403)(scope, receive, send)
                    return
            await self.bearer.app(inner, receive, send)
            return
        if scope["method"] in _SAFE_METHODS and _wants_page(path, headers):
            target = LOGIN_PATH + ("?expired=1" if token is not None else "")
            await RedirectResponse(target, status_code=303)(scope, receive, send)
        elif token is not None:
            await _refuse(
                f"the dashboard's login has ended (it expired, was logged out, or llmd restarted); "
                f"log in again at {LOGIN_PATH}", 401,
            )(scope, receive, send)
        else:
            await self.bearer(scope, receive, send)


def _wants_page(path: str, headers: Headers) -> bool:
    """A browser navigating to a dashboard page, rather than a script fetching data."""
    is_dashboard = path == DASHBOARD_PATH or path.startswith(DASHBOARD_PATH + "/")
    return is_dashboard and "text/html" in headers.get("accept", "")

"""Where the dashboard is, or how to turn it on: for `llmctl status`, and for a browser that
asks the proxy's port for `/dashboard` (the dashboard lives on the management listeners).

Serving that pointer page needs no API key: it tells nothing beyond where the management
listener is, and that listener keeps its own access control.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.responses import HTMLResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from llmd.daemon.config import DaemonConfig, split_host_port
from llmd.daemon.util.loopback import reachable_url

DASHBOARD_PATH = "/dashboard"
# A local port for the SSH forward the advice suggests (anything free on the user's machine).
TUNNEL_PORT = 8809
_WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class DashboardLocation:
    enabled: bool
    # Where a browser opens it; None when no TCP listener serves it.
    url: str | None
    # One line on how to open it (or turn it on).
    how: str

    def as_dict(self) -> dict[str, object]:
        return {"enabled": self.enabled, "url": self.url, "how": self.how}


def dashboard_location(config: DaemonConfig, seen_as: str | None = None) -> DashboardLocation:
    """Where the dashboard of a daemon with `config` is. `seen_as`: the host name a browser
    used to reach this daemon, which stands in for a wildcard management address."""
    server = config.server
    if not config.dashboard.enabled:
        return DashboardLocation(False, None, "the dashboard is off: set [dashboard] enabled = true in llmd.toml and restart llmd")
    if server.management_listen is not None:
        host, port = split_host_port(server.management_listen)
        if host in _WILDCARDS and seen_as:
            host = seen_as
        url = reachable_url(host, port) + DASHBOARD_PATH
        return DashboardLocation(True, url, f"open {url} and log in with the [server] management_token")
    return DashboardLocation(
        True,
        None,
        f"the dashboard is served on the management socket only: forward it with "
        f"`ssh -L {TUNNEL_PORT}:{server.socket} THIS-HOST` and open http://127.0.0.1:{TUNNEL_PORT}{DASHBOARD_PATH}, "
        "or set [server] management_listen and management_token in llmd.toml to serve it over TCP",
    )


def _host_of(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"host":
            return urlsplit("//" + value.decode("latin-1")).hostname
    return None


class DashboardPointer:
    """In front of the proxy app: `GET /dashboard` (and pages under it) answers where the
    dashboard is instead of a bare 404; everything else goes on to `app`. `config` is called
    per request, so a reloaded llmd.toml is followed."""

    def __init__(self, app: ASGIApp, config: Callable[[], DaemonConfig]) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD") or not (
            path == DASHBOARD_PATH or path.startswith(DASHBOARD_PATH + "/")
        ):
            await self.app(scope, receive, send)
            return
        where = dashboard_location(self.config(), _host_of(scope))
        link = f'<p><a href="{html.escape(where.url)}">{html.escape(where.url)}</a></p>' if where.url else ""
        body = (
            "<!doctype html><meta charset=utf-8><title>llmd dashboard</title>"
            "<p>This is llmd's OpenAI-compatible port; the dashboard is not served here.</p>"
            f"<p>{html.escape(where.how)}.</p>{link}"
        )
        # 404: nothing lives at this path here; the body says where it does.
        await HTMLResponse(body, status_code=404)(scope, receive, send)

"""The dashboard's playground: chat with a profile from the browser, through the proxy itself.

The page is served on the management listener, another origin than the proxy's, and the proxy
may want an API key the browser does not have. So the page posts its chat requests to its own
origin, `POST /dashboard/playground/chat`, and `PlaygroundChat` hands each one, unchanged, to
the proxy's app as `POST /v1/chat/completions`: the same code as on `[server] listen`, with its
metrics and request log, loading the model on demand and streaming the reply straight back.
Whoever may use the dashboard may already load and unload every model, so the dashboard's own
access control (the unix socket's permissions, or the management token's login) admits the
request; no API key is asked for, and none ever reaches the page.

Only the headers that describe the body pass on: never the dashboard's cookie or an
`Authorization` header, which the proxy would otherwise send to the engine.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

CHAT_ROUTE = "/v1/chat/completions"
_PASSED_HEADERS = frozenset({b"content-type", b"content-length", b"accept"})


class PlaygroundChat:
    """ASGI app: the page's chat request, answered by `proxy` as a `POST /v1/chat/completions`."""

    def __init__(self, proxy: ASGIApp) -> None:
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(name, value) for name, value in scope["headers"] if name.lower() in _PASSED_HEADERS]
        chat = {
            **scope,
            "path": CHAT_ROUTE,
            "raw_path": CHAT_ROUTE.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": headers,
        }
        await self.proxy(chat, receive, send)

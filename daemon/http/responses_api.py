"""OpenAI's Responses API on the proxy listener: `POST /v1/responses`, passed to engines that
serve it themselves (their driver's `native_routes`). It keeps conversation state and runs
built-in tools on the server, which a translation to chat completions could not do faithfully,
so for other engines the answer is a 404 that names the engine."""

from __future__ import annotations

import logging
from functools import partial

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from llmd.daemon.http.engine_routes import (
    ModelRequest,
    Refused,
    call_engine,
    forwarded_headers,
    read_model_request,
    route_not_served,
    serves_natively,
)
from llmd.daemon.http.error_status import failure_message
from llmd.daemon.http.openai_errors import CLIENT_GONE, error_response
from llmd.daemon.http.proxy import ClientApi, Proxy, _ClientGone, _unless_disconnected
from llmd.drivers.base import OPENAI_RESPONSES

log = logging.getLogger(__name__)


class ResponsesEndpoint:
    """The ASGI endpoint of `POST /v1/responses`; it answers its own failures, in OpenAI's shape."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self.answer(scope, receive)
        except Exception:
            log.exception("llmd failed on %s %s", scope["method"], scope["path"])
            response = error_response(500, failure_message(scope["method"], scope["path"]))
        await response(scope, receive, send)

    async def answer(self, scope: Scope, receive: Receive) -> Response:
        try:
            request = await read_model_request(self.proxy, scope, receive, error_response)
            if not serves_natively(self.proxy, request.engine, OPENAI_RESPONSES):
                return route_not_served(error_response, request, OPENAI_RESPONSES, "use POST /v1/chat/completions")
            return await _unless_disconnected(scope, receive, partial(self._pass, scope, request))
        except Refused as refusal:
            return refusal.reply
        except _ClientGone:
            return Response(status_code=CLIENT_GONE)

    async def _pass(self, scope: Scope, request: ModelRequest) -> Response:
        reply = await call_engine(self.proxy, request.model, OPENAI_RESPONSES, forwarded_headers(scope), request.body, error_response)
        if reply.streams:
            return reply.relay_stream()
        return reply.relayed(await reply.whole(error_response))


def responses_api(proxy: Proxy) -> ClientApi:
    """OpenAI's Responses route, for `build_proxy_app`. Its errors are OpenAI's, as the rest of
    OpenAI's API: it owns no path whose 401 differs."""
    return ClientApi(
        endpoints={OPENAI_RESPONSES: ResponsesEndpoint(proxy)},
        owns=lambda path: False,
        unauthorized=lambda message: error_response(401, message, code="invalid_api_key"),
    )

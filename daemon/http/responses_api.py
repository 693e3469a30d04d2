"""OpenAI's Responses API on the proxy listener: `POST /v1/responses`, passed to engines that
serve it themselves (their driver's `native_routes`). It keeps conversation state and runs
built-in tools on the server, which a translation to chat completions could not do faithfully,
so for other engines the answer is a 404 that names the engine."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

from starlette.responses import Response
from starlette.types import Scope

from llmd.daemon.http.engine_routes import (
    EngineRouteEndpoint,
    ModelRequest,
    Refused,
    call_engine,
    forwarded_headers,
    route_not_served,
    serves_natively,
)
from llmd.daemon.http.openai_errors import error_response
from llmd.daemon.http.proxy import ClientApi, Proxy
from llmd.drivers.base import OPENAI_RESPONSES


class ResponsesEndpoint(EngineRouteEndpoint):
    """The ASGI endpoint of `POST /v1/responses`; it answers its own failures, in OpenAI's shape."""

    error = staticmethod(error_response)

    def work(self, scope: Scope, request: ModelRequest) -> Callable[[], Awaitable[Response]]:
        if not serves_natively(self.proxy, request.engine, OPENAI_RESPONSES):
            raise Refused(route_not_served(error_response, request, OPENAI_RESPONSES, "use POST /v1/chat/completions"))
        return partial(self._pass, scope, request)

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

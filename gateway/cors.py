"""CORS for browser clients: off unless origins are allowed (ALLOW_ORIGINS or `allowOrigins`)."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from gateway.state import SETTINGS, STORE
from wire.errors import Handler

_ORIGIN = web.RequestKey("cors_origin", str)
_EXPOSED = "X-Request-ID, x-gateway-upstream-model, Retry-After"


def _allowed_origins(app: web.Application) -> Sequence[str]:
    from_env = app[SETTINGS].allow_origins
    return from_env if from_env is not None else app[STORE].current.config.allow_origins


def _allow_origin_value(origin: str, allowed: Sequence[str]) -> str | None:
    if "*" in allowed:
        return "*"
    return origin if origin in allowed else None


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if origin is None:
        return await handler(request)
    value = _allow_origin_value(origin, _allowed_origins(request.app))
    if value is None:
        # No CORS headers: the browser refuses the response, as it should.
        return await handler(request)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        headers = {
            "Access-Control-Allow-Origin": value,
            "Access-Control-Allow-Methods": "GET, POST, PUT, PATCH, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": request.headers.get(
                "Access-Control-Request-Headers", "Authorization, Content-Type"
            ),
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        }
        return web.Response(status=204, headers=headers)
    request[_ORIGIN] = value
    return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook, so streamed and error responses get the headers too."""
    value = request.get(_ORIGIN)
    if value is not None:
        response.headers["Access-Control-Allow-Origin"] = value
        response.headers["Access-Control-Expose-Headers"] = _EXPOSED
        if value != "*":
            response.headers.add("Vary", "Origin")

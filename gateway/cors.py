"""CORS for browser clients: off unless origins are allowed (ALLOW_ORIGINS or `allowOrigins`).
The gateway's one middleware (middleware.py) calls these."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from gateway.state import SETTINGS, STORE

_EXPOSED = "X-Request-ID, x-gateway-upstream-model, Retry-After"


def _allowed_origins(app: web.Application) -> Sequence[str]:
    from_env = app[SETTINGS].allow_origins
    return from_env if from_env is not None else app[STORE].current.config.allow_origins


def _allow_origin_value(origin: str, allowed: Sequence[str]) -> str | None:
    if "*" in allowed:
        return "*"
    return origin if origin in allowed else None


def allowed_origin(request: web.Request) -> str | None:
    """The Access-Control-Allow-Origin value for this request, or None: no CORS headers
    (no Origin, or one not allowed: the browser refuses the response, as it should)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    return _allow_origin_value(origin, _allowed_origins(request.app))


def preflight(request: web.Request, allowed: str) -> web.Response | None:
    """The answer to a CORS preflight from an allowed origin; None for any other request."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return None
    headers = {
        "Access-Control-Allow-Origin": allowed,
        "Access-Control-Allow-Methods": "GET, POST, PUT, PATCH, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": request.headers.get(
            "Access-Control-Request-Headers", "Authorization, Content-Type"
        ),
        "Access-Control-Max-Age": "600",
        "Vary": "Origin",
    }
    return web.Response(status=204, headers=headers)


def add_cors_headers(response: web.StreamResponse, allowed: str) -> None:
    """Called as the response is prepared, so streamed and error responses get them too."""
    response.headers["Access-Control-Allow-Origin"] = allowed
    response.headers["Access-Control-Expose-Headers"] = _EXPOSED
    if allowed != "*":
        response.headers.add("Vary", "Origin")

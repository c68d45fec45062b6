"""The OpenAI error envelope, and an aiohttp middleware that puts every failure into it."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Error `type` values that OpenAI clients recognise.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
UPSTREAM_ERROR = "upstream_error"


def error_payload(
    message: str,
    type_: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The `{"error": {...}}` object OpenAI returns, with all four keys always present."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """An error that should reach the client as an OpenAI-shaped JSON response."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def payload(self) -> dict[str, Any]:
        return error_payload(self.message, self.type, self.param, self.code)

    def to_response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=json.dumps(self.payload()).encode(),
            content_type="application/json",
            headers=self.headers,
        )


def error_response(
    status: int,
    message: str,
    type_: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return APIError(status, message, type_, param, code, headers).to_response()


# aiohttp raises these for requests that never reach a handler's own logic.
_HTTP_ERRORS: dict[int, tuple[str, str]] = {
    404: (NOT_FOUND, "not_found"),
    405: (INVALID_REQUEST, "method_not_allowed"),
    413: (INVALID_REQUEST, "request_too_large"),
}


def _from_http_exception(exc: web.HTTPException) -> web.Response:
    type_, code = _HTTP_ERRORS.get(
        exc.status, (INVALID_REQUEST if exc.status < 500 else SERVER_ERROR, None)
    )
    if exc.status == 404:
        message = "Unknown route. See /v1/models for the models and the README for the routes."
    elif exc.status == 413:
        message = f"Request body too large: {exc.text or ''}".strip()
    else:
        message = exc.reason
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    return error_response(exc.status, message, type_, None, code, headers)


def error_response_for(request: web.Request, exc: Exception) -> web.Response:
    """The OpenAI error body for an exception out of a handler; never a stack trace.
    Redirects and other HTTP exceptions under 400 are raised again."""
    if isinstance(exc, APIError):
        return exc.to_response()
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return _from_http_exception(exc)
    # The traceback goes to the log (with the request id bound there), never to the client.
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
    return error_response(
        500, "Internal error; it has been logged.", SERVER_ERROR, None, "internal_error"
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every exception into an OpenAI error body; never leak a stack trace."""
    try:
        return await handler(request)
    except Exception as exc:
        return error_response_for(request, exc)

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

    # One constructor per status family, taken by keyword. Each carries the `type` OpenAI
    # gives that status; `type_` overrides it where a caller must keep another one.

    @classmethod
    def bad_request(
        cls,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> APIError:
        """400 `invalid_request_error`."""
        return cls(400, message, INVALID_REQUEST, param, code, headers)

    @classmethod
    def unauthorized(
        cls,
        message: str,
        *,
        code: str,
        type_: str = AUTHENTICATION,
        headers: Mapping[str, str] | None = None,
    ) -> APIError:
        """401, with the `WWW-Authenticate: Bearer` challenge RFC 7235 requires of a 401.
        OpenAI's own key errors are `invalid_request_error`: pass `type_` to answer so."""
        return cls(
            401, message, type_, None, code, {"WWW-Authenticate": "Bearer", **(headers or {})}
        )

    @classmethod
    def forbidden(
        cls,
        message: str,
        *,
        code: str,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> APIError:
        """403 `permission_error`."""
        return cls(403, message, PERMISSION, param, code, headers)

    @classmethod
    def not_found(
        cls,
        message: str,
        *,
        code: str,
        param: str | None = None,
        type_: str = INVALID_REQUEST,
        headers: Mapping[str, str] | None = None,
    ) -> APIError:
        """404. OpenAI answers an unknown model or object with `invalid_request_error`;
        `type_=NOT_FOUND` is for a route that does not exist."""
        return cls(404, message, type_, param, code, headers)

    @classmethod
    def too_large(
        cls,
        message: str,
        *,
        code: str = "request_too_large",
        param: str | None = None,
    ) -> APIError:
        """413 `invalid_request_error`."""
        return cls(413, message, INVALID_REQUEST, param, code)

    @classmethod
    def rate_limited(
        cls,
        message: str,
        *,
        retry_after: int,
        code: str = "rate_limit_exceeded",
        headers: Mapping[str, str] | None = None,
    ) -> APIError:
        """429 `rate_limit_error`, with `Retry-After` in whole seconds."""
        return cls(
            429,
            message,
            RATE_LIMIT,
            None,
            code,
            {"Retry-After": str(retry_after), **(headers or {})},
        )

    @classmethod
    def unavailable(
        cls,
        message: str,
        *,
        code: str,
        retry_after: int | None = None,
        type_: str = SERVER_ERROR,
        headers: Mapping[str, str] | None = None,
    ) -> APIError:
        """503 `server_error` (`type_=RATE_LIMIT` where the cause is load), with
        `Retry-After` in whole seconds when given."""
        return cls(503, message, type_, None, code, _with_retry_after(headers, retry_after))

    @classmethod
    def internal(cls, message: str, *, code: str = "internal_error") -> APIError:
        """500 `server_error`. The message must never carry an exception's text."""
        return cls(500, message, SERVER_ERROR, None, code)

    @classmethod
    def upstream(
        cls,
        status: int,
        message: str,
        *,
        code: str,
        retry_after: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> APIError:
        """`upstream_error` with the status that says how the backend failed (502, 503, 504)."""
        return cls(
            status, message, UPSTREAM_ERROR, None, code, _with_retry_after(headers, retry_after)
        )

    def payload(self) -> dict[str, Any]:
        return error_payload(self.message, self.type, self.param, self.code)

    def to_response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=json.dumps(self.payload()).encode(),
            content_type="application/json",
            headers=self.headers,
        )


def _with_retry_after(headers: Mapping[str, str] | None, retry_after: int | None) -> dict[str, str]:
    out = dict(headers or {})
    if retry_after is not None:
        out["Retry-After"] = str(retry_after)
    return out


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
    return APIError(exc.status, message, type_, code=code, headers=headers).to_response()


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
    return APIError.internal("Internal error; it has been logged.").to_response()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every exception into an OpenAI error body; never leak a stack trace."""
    try:
        return await handler(request)
    except Exception as exc:
        return error_response_for(request, exc)

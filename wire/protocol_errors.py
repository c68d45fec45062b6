"""The errors aiohttp answers itself, before any middleware can run, in OpenAI's error shape
like every other error: a request line or header over the parser's limits, a method the
parser refuses, and an `Expect` other than `100-continue`."""

from __future__ import annotations

import json

from aiohttp import HttpVersion11, web, web_protocol, web_server
from aiohttp.web_request import BaseRequest

from wire.errors import APIError


class _JSONErrorHandler(web_protocol.RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own version logs the error and refuses when a response already started.
        plain = super().handle_error(request, status, exc, message)
        if status >= 500:
            body = APIError.internal("Internal error; it has been logged.").payload()
        else:
            # The parser's message quotes the request's bytes: keep only what went wrong.
            reason = (message or plain.reason or "").split(":", 1)[0].strip()[:200]
            body = APIError.bad_request(
                f"The request could not be read as HTTP: {reason}.", code="bad_request"
            ).payload()
        response = web.Response(
            status=status, body=json.dumps(body).encode(), content_type="application/json"
        )
        response.force_close()
        return response


class _JSONErrorServer(web_server.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _JSONErrorHandler(self, loop=self._loop, **self._kwargs)


def answer_protocol_errors_in_json(runner: web.BaseRunner) -> None:
    """After `runner.setup()`: the connections it accepts answer parse errors in JSON.
    aiohttp offers no setting for the handler class, so the server's class is narrowed to a
    subclass that only changes which handler each connection gets."""
    server = runner.server
    assert server is not None, "call after runner.setup()"
    server.__class__ = _JSONErrorServer


async def expect_continue(request: web.Request) -> None:
    """aiohttp's default `Expect` handling, with its 417 in OpenAI's shape."""
    expect = request.headers.get("Expect", "")
    if request.version == HttpVersion11:
        if expect.lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the real response has not started yet
            return
        body = APIError.bad_request(
            "Only 'Expect: 100-continue' is supported.", param="Expect", code="bad_expect"
        ).payload()
        raise web.HTTPExpectationFailed(text=json.dumps(body), content_type="application/json")

"""The OpenAI API surface: model listing, and model-addressed requests proxied to a backend."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from gateway.access import Caller, authorize
from gateway.catalog import Catalog
from gateway.failover import Failover, NoBackend
from gateway.multipart import boundary_of, replace_model_field
from gateway.observe import record_of
from gateway.relay import relay
from gateway.rewrite import dumps, loads, splice_models
from gateway.routing import Hop, Route, Snapshot
from gateway.state import (
    BACKENDS,
    CATALOG,
    LIMITER,
    METRICS,
    POLICIES,
    REDACTOR,
    SESSION,
    STORE,
)
from gateway.upstream import Deadline, UpstreamError
from wire.errors import INVALID_REQUEST, UPSTREAM_ERROR, APIError
from wire.protocol_errors import expect_continue

# Routes with a name of their own in metrics; any other path is "passthrough".
NAMED_ROUTES = {
    "chat/completions": "chat.completions",
    "completions": "completions",
    "embeddings": "embeddings",
}
_STARTED = int(time.time())
_INCLUDE_USAGE_MEMBER = b'"stream_options":{"include_usage":true}'


def _model_card(model_id: str, name: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": _STARTED,
        "owned_by": "gateway",
        "name": name,
    }


def _cards(route: Route, catalog: Catalog) -> list[dict[str, Any]]:
    """One card per public model, never per replica; a wildcard route lists what its backend
    serves (as last fetched), never the pattern itself."""
    if not route.wildcard:
        return [_model_card(route.public_id, route.display_name)]
    return [_model_card(route.prefix + m, _wildcard_name(route, m)) for m in catalog.models(route)]


def _wildcard_name(route: Route, model: str) -> str:
    if route.display_name == route.public_id:
        return route.prefix + model
    return f"{route.display_name}: {model}"


async def list_models(request: web.Request) -> web.Response:
    """Answered from memory: UIs call this on every page load and must never wait on a backend."""
    record_of(request).route = "models"
    snapshot = request.app[STORE].current
    caller = _caller(request, snapshot)
    catalog = request.app[CATALOG]
    data = [
        card
        for route in snapshot.routes.values()
        for card in _cards(route, catalog)
        if caller is None or caller.may_use(card["id"])
    ]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    record_of(request).route = "models"
    model_id = request.match_info["model_id"]
    snapshot = request.app[STORE].current
    caller = _caller(request, snapshot)
    route = snapshot.resolve(model_id)
    if route is None or (caller is not None and not caller.may_use(model_id)):
        raise _unknown_model(model_id, snapshot, caller)
    if route.wildcard:
        name = _wildcard_name(route, model_id[len(route.prefix) :])
        return web.json_response(_model_card(model_id, name))
    return web.json_response(_model_card(route.public_id, route.display_name))


def _caller(request: web.Request, snapshot: Snapshot) -> Caller | None:
    """Who is calling, when client keys are configured (401 without a valid one)."""
    caller = snapshot.keyring.authenticate(request)
    if caller is not None:
        record_of(request).key = caller.name
    return caller


def _unknown_model(model: str, snapshot: Snapshot, caller: Caller | None = None) -> APIError:
    # A key sees only the models it may use, even in this message.
    visible = [m for m in snapshot.routes if caller is None or caller.may_use(m)]
    available = ", ".join(visible) or "(none)"
    return APIError(
        404,
        f"The model '{model}' does not exist. Available models: {available}.",
        INVALID_REQUEST,
        "model",
        "model_not_found",
    )


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"Request body is larger than the gateway's limit of {limit} bytes (maxRequestBytes).",
        INVALID_REQUEST,
        None,
        "request_too_large",
    )


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    content = request.content
    try:
        chunk = await content.readany()
        if content.at_eof():  # the whole body in one read: most requests
            if len(chunk) > limit:
                raise _too_large(limit)
            return chunk
        body = bytearray(chunk)
        while True:
            if len(body) > limit:
                raise _too_large(limit)
            chunk = await content.readany()
            if not chunk:
                return bytes(body)
            body += chunk
    except RequestPayloadError as exc:
        # e.g. a body that is not the gzip its Content-Encoding says it is
        raise APIError(
            400, f"Could not read the request body: {exc}.", INVALID_REQUEST, None, "invalid_body"
        ) from None


def _checked_tail(request: web.Request) -> str:
    """The raw path below the API root, refusing anything that could climb out of the
    backend's base URL (`..`, encoded `%2e%2e` or `%2f`, empty segments)."""
    raw = request.rel_url.raw_path
    tail = raw[len("/v1/") :] if raw.startswith("/v1/") else raw.lstrip("/")
    for segment in tail.split("/"):
        decoded = unquote(segment)
        if decoded in ("", ".", "..") or "/" in decoded or "\\" in decoded:
            raise APIError(
                400,
                f"Invalid request path '{request.path}'.",
                INVALID_REQUEST,
                None,
                "invalid_path",
            )
    return tail


class _Body:
    """The request body with its `model` found, ready to be rewritten for a route."""

    def __init__(self, request: web.Request, raw: bytes) -> None:
        self.raw = raw
        self.content_type = request.headers.get("Content-Type", "")
        self._boundary = (
            boundary_of(self.content_type)
            if self.content_type.lower().startswith("multipart/form-data")
            else None
        )
        self.payload: dict[str, Any] | None = None
        self.model = self._find_model()

    def _find_model(self) -> str:
        if self._boundary is not None:
            model, _ = replace_model_field(self.raw, self._boundary, None)
            if model is None:
                raise _missing_model()
            return model
        if not self.raw.strip():
            raise _missing_model()
        try:
            payload = loads(self.raw)
        except RecursionError:
            raise APIError(
                400, "The JSON body is nested too deeply.", INVALID_REQUEST, None, "invalid_json"
            ) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(
                400,
                f"We could not parse the JSON body of your request ({exc}). "
                "The body must be a JSON object.",
                INVALID_REQUEST,
                None,
                "invalid_json",
            ) from None
        if not isinstance(payload, dict):
            raise APIError(
                400,
                "The request body must be a JSON object.",
                INVALID_REQUEST,
                None,
                "invalid_json",
            )
        model = payload.get("model")
        if model is None:
            raise _missing_model()
        if not isinstance(model, str) or not model:
            raise APIError(
                400,
                "'model' must be a non-empty string.",
                INVALID_REQUEST,
                "model",
                "invalid_model",
            )
        self.payload = payload
        return model

    @property
    def wants_usage(self) -> bool:
        """A stream whose client did not ask for usage: the gateway asks for it (token counts
        for logs and metrics) and removes it from what the client sees."""
        if self.payload is None or self.payload.get("stream") is not True:
            return False
        options = self.payload.get("stream_options")
        return options is None or (isinstance(options, dict) and not options.get("include_usage"))

    def for_hop(self, hop: Hop, ask_usage: bool) -> bytes:
        if self._boundary is not None:
            return replace_model_field(self.raw, self._boundary, hop.upstream_model)[1]
        assert self.payload is not None
        if not ask_usage and hop.upstream_model == self.model:
            return self.raw
        # Only the model's bytes change (and stream_options is added) where that is provably
        # what re-encoding would give; re-encoding is for the rest.
        if ask_usage:
            if "stream_options" not in self.payload:
                expected = {
                    **self.payload,
                    "model": hop.upstream_model,
                    "stream_options": {"include_usage": True},
                }
                spliced = splice_models(
                    self.raw, hop.upstream_model, expected, 1, _INCLUDE_USAGE_MEMBER
                )
                if spliced is not None:
                    return spliced
            exact = json.loads(self.raw)
            options = {**(exact.get("stream_options") or {}), "include_usage": True}
            return dumps({**exact, "model": hop.upstream_model, "stream_options": options})
        spliced = splice_models(
            self.raw, hop.upstream_model, {**self.payload, "model": hop.upstream_model}, 1
        )
        if spliced is not None:
            return spliced
        return dumps({**json.loads(self.raw), "model": hop.upstream_model})


def _missing_model() -> APIError:
    return APIError(
        400,
        "You must provide a model parameter: the gateway routes each request by its 'model'.",
        INVALID_REQUEST,
        "model",
        "missing_model",
    )


async def proxy(request: web.Request) -> web.StreamResponse:
    """Any model-addressed request: route by `model`, rewrite it, forward, relay the answer."""
    record = record_of(request)
    tail = _checked_tail(request)
    record.route = NAMED_ROUTES.get(tail, "passthrough")
    snapshot = request.app[STORE].current  # kept for the whole request, whatever reloads
    caller = _caller(request, snapshot)
    raw = await _read_body(request, snapshot.config.max_request_bytes)
    body = _Body(request, raw)
    record.model = body.model[:200]  # metrics map unknown ids to "other"
    route = snapshot.resolve(body.model)
    if route is None:
        raise _unknown_model(body.model, snapshot, caller)
    authorize(caller, body.model)
    record.route_id = route.public_id
    limiter = request.app[LIMITER]
    admission = None if caller is None else await limiter.admit(caller)  # or 429
    if admission is not None:
        record.limit_headers = admission.headers
    meters = record.meters
    in_flight = (
        meters.in_flight(route.public_id)
        if meters is not None
        else request.app[METRICS].in_flight.labels(route.public_id)
    )
    in_flight.inc()
    deadline = Deadline(route.timeouts, record.started)
    try:
        return await _forward(request, route, body, tail, deadline)
    finally:
        deadline.close()  # its timer, if any, goes with the request
        in_flight.dec()
        if admission is not None:
            limiter.release(
                admission, route.public_id, record.prompt_tokens or 0, record.completion_tokens or 0
            )


async def _forward(
    request: web.Request, route: Route, body: _Body, tail: str, deadline: Deadline
) -> web.StreamResponse:
    record = record_of(request)
    app = request.app
    failover = Failover(
        app[SESSION], app[BACKENDS], app[POLICIES], route, body.model, record, deadline
    )
    try:
        sent = await failover.send(
            request.method,
            tail,
            request.rel_url.raw_query_string,
            request.headers,
            body.for_hop,
            "application/json" if body.payload is not None else None,
            wants_usage=body.wants_usage and tail in ("chat/completions", "completions"),
        )
    except UpstreamError as exc:
        record.error = exc.kind
        raise APIError(exc.status, exc.message, UPSTREAM_ERROR, None, exc.kind) from None
    except NoBackend as exc:
        record.error = exc.code
        raise APIError(
            exc.status,
            exc.message,
            UPSTREAM_ERROR,
            None,
            exc.code,
            headers={"Retry-After": str(max(1, round(exc.retry_after)))},
        ) from None

    upstream = sent.response
    completed = False
    try:
        # Past this point the client has an answer started: failures end it in-band.
        response = await relay(request, sent, record, deadline, app[REDACTOR])
        completed = record.error is None
        return response
    finally:
        # A body not read to its end (client gone, backend failed) must close the connection:
        # that is what tells the backend to stop generating.
        if completed:
            upstream.release()
        else:
            upstream.close()
        # The verdict on the backend comes when its answer is over: a stream that dies after
        # its headers is a failure, not a success.
        backends = app[BACKENDS]
        if record.error and record.error != "client_disconnected":
            backends.failed(sent.ticket, route.circuit_breaker, record.error)
        elif completed and upstream.status < 500:
            backends.succeeded(sent.ticket)
        backends.end(sent.ticket)


async def proxy_unprefixed(request: web.Request) -> web.StreamResponse:
    """Paths without `/v1`: only methods that carry a body are proxied, so that a stray GET
    (a browser's /favicon.ico) is a plain 404 rather than a complaint about a missing model."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        raise web.HTTPNotFound()
    return await proxy(request)


def add_routes(app: web.Application) -> None:
    for prefix in ("/v1", ""):
        app.router.add_get(f"{prefix}/models", list_models, expect_handler=expect_continue)
        app.router.add_get(
            f"{prefix}/models/{{model_id:.+}}", get_model, expect_handler=expect_continue
        )
        for tail in NAMED_ROUTES:
            app.router.add_post(f"{prefix}/{tail}", proxy, expect_handler=expect_continue)
    # Everything else goes to the backend that owns the body's model.
    app.router.add_route("*", "/v1/{tail:.+}", proxy, expect_handler=expect_continue)
    app.router.add_route("*", "/{tail:.+}", proxy_unprefixed, expect_handler=expect_continue)

"""The OpenAI API surface: model listing, and model-addressed requests proxied to a backend."""

from __future__ import annotations

import re
from dataclasses import replace
from urllib.parse import unquote

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from gateway.catalog import Catalog
from gateway.client_keys import Caller, authorize
from gateway.middleware import record_of
from gateway.proxy import ClientRequest, ProxiedRequest
from gateway.request_body import RequestBody
from gateway.rewrite import loads
from gateway.routing import Route, Snapshot
from gateway.state import (
    BACKENDS,
    CATALOG,
    DNS,
    LIMITER,
    METRICS,
    OBJECTS,
    POLICIES,
    REDACTOR,
    SESSION,
    STARTED,
    STORE,
)
from gateway.upstream import Deadline
from wire.errors import APIError
from wire.protocol import ModelCard, model_card, model_list
from wire.protocol_errors import expect_continue

# Endpoint families with a name of their own in metrics; any other path is "passthrough".
FAMILIES = {
    "chat/completions": "chat.completions",
    "completions": "completions",
    "embeddings": "embeddings",
}
# The families whose streams carry `usage` when asked with stream_options.
_USAGE_STREAMS = ("chat/completions", "completions")


def _model_card(model_id: str, name: str, created: int) -> ModelCard:
    return model_card(model_id, created=created, owned_by="gateway", name=name)


def _cards(route: Route, catalog: Catalog, created: int) -> list[ModelCard]:
    """One card per public model, never per replica; a wildcard route lists what its backend
    serves (as last fetched), never the pattern itself."""
    if not route.wildcard:
        return [_model_card(route.public_id, route.display_name, created)]
    return [
        _model_card(route.prefix + m, _wildcard_name(route, m), created)
        for m in catalog.models(route)
    ]


def _wildcard_name(route: Route, model: str) -> str:
    if route.display_name == route.public_id:
        return route.prefix + model
    return f"{route.display_name}: {model}"


async def list_models(request: web.Request) -> web.Response:
    """Answered from memory: UIs call this on every page load and must never wait on a backend."""
    record_of(request).family = "models"
    snapshot = request.app[STORE].current
    caller = _caller(request, snapshot)
    catalog, created = request.app[CATALOG], request.app[STARTED]
    data = [
        card
        for route in snapshot.routes.values()
        for card in _cards(route, catalog, created)
        if caller is None or caller.may_use(card["id"])
    ]
    return web.json_response(model_list(data))


async def get_model(request: web.Request) -> web.Response:
    record_of(request).family = "models"
    model_id = request.match_info["model_id"]
    snapshot = request.app[STORE].current
    caller = _caller(request, snapshot)
    route = snapshot.resolve(model_id)
    if route is None or (caller is not None and not caller.may_use(model_id)):
        raise _unknown_model(model_id, snapshot, caller)
    created = request.app[STARTED]
    if route.wildcard:
        name = _wildcard_name(route, model_id[len(route.prefix) :])
        return web.json_response(_model_card(model_id, name, created))
    return web.json_response(_model_card(route.public_id, route.display_name, created))


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
    return APIError.not_found(
        f"The model '{model}' does not exist. Available models: {available}.",
        code="model_not_found",
        param="model",
    )


def _too_large(limit: int) -> APIError:
    return APIError.too_large(
        f"Request body is larger than the gateway's limit of {limit} bytes (maxRequestBytes)."
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
        raise APIError.bad_request(
            f"Could not read the request body: {exc}.", code="invalid_body"
        ) from None


def _checked_tail(request: web.Request) -> str:
    """The raw path below the API root, refusing anything that could climb out of the
    backend's base URL (`..`, encoded `%2e%2e` or `%2f`, empty segments)."""
    raw = request.rel_url.raw_path
    tail = raw[len("/v1/") :] if raw.startswith("/v1/") else raw.lstrip("/")
    for segment in tail.split("/"):
        decoded = unquote(segment)
        if decoded in ("", ".", "..") or "/" in decoded or "\\" in decoded:
            raise APIError.bad_request(
                f"Invalid request path '{request.path}'.", code="invalid_path"
            )
    return tail


def _by_model(
    request: web.Request, snapshot: Snapshot, caller: Caller | None, raw: bytes
) -> tuple[Route, RequestBody]:
    """The route of the body's `model` (404 for one not configured, 403 for one the key may
    not use)."""
    body = RequestBody(request.headers.get("Content-Type", ""), raw)
    record_of(request).model = body.model[:200]  # metrics map unknown ids to "other"
    route = snapshot.resolve(body.model)
    if route is None:
        raise _unknown_model(body.model, snapshot, caller)
    authorize(caller, body.model)
    return route, body


# Requests that name a Responses API object rather than a model: retrieve, delete, its input
# items, cancel. (`responses/input_tokens` and the like carry a `model`, and are routed by it.)
_OBJECT_PATH = re.compile(r"responses/([^/]+)(?:/input_items|/cancel)?")


def _object_named(tail: str, raw: bytes) -> str | None:
    """The id a request names instead of a model: a path above with no `model` in its body."""
    match = _OBJECT_PATH.fullmatch(tail)
    if match is None:
        return None
    if raw.strip():
        try:
            payload = loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None  # the model route's parser explains what is wrong
        if not isinstance(payload, dict) or "model" in payload:
            return None
    return unquote(match.group(1))


async def _by_object(
    request: web.Request, snapshot: Snapshot, caller: Caller | None, object_id: str, raw: bytes
) -> tuple[Route, RequestBody]:
    """The route to the one backend that created the object. An id the gateway never saw,
    another key's, or one whose backend is no longer configured: 404, as OpenAI answers."""
    entry = await request.app[OBJECTS].recall(object_id)
    route = None if entry is None else snapshot.resolve(entry.model)
    if route is not None:  # the object's backend may be a discovered address
        route = request.app[DNS].expand(route)
    target = None
    if entry is not None and route is not None and (caller is None or caller.name == entry.key):
        target = next((t for t in route.targets if t.key == entry.target), None)
    if entry is None or route is None or target is None:
        raise APIError.not_found(
            f"No response with id '{object_id}' was created through this gateway "
            "(or it has expired).",
            code="not_found",
        )
    authorize(caller, entry.model)
    record_of(request).model = entry.model[:200]
    body = RequestBody.as_sent(request.headers.get("Content-Type", ""), raw, entry.model)
    return replace(route, targets=(target,)), body


async def proxy(request: web.Request) -> web.StreamResponse:
    """Any model-addressed request (or one naming an object the gateway saw created): route
    it, rewrite the model, forward, relay the answer."""
    record = record_of(request)
    tail = _checked_tail(request)
    record.family = FAMILIES.get(tail, "passthrough")
    snapshot = request.app[STORE].current  # kept for the whole request, whatever reloads
    caller = _caller(request, snapshot)
    raw = await _read_body(request, snapshot.config.max_request_bytes)
    object_id = _object_named(tail, raw)
    if object_id is None:
        route, body = _by_model(request, snapshot, caller, raw)
        route = request.app[DNS].expand(route)  # discovered backends: their addresses now
    else:
        route, body = await _by_object(request, snapshot, caller, object_id, raw)
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
    app = request.app
    client = ClientRequest(
        request.method,
        tail,
        request.rel_url.raw_query_string,
        request.headers,
        body,
        wants_usage=body.wants_usage and tail in _USAGE_STREAMS,
        creates_objects=request.method == "POST" and tail == "responses",
    )
    proxied = ProxiedRequest(
        app[SESSION],
        app[BACKENDS],
        app[POLICIES],
        app[REDACTOR],
        route,
        client,
        record,
        deadline,
        objects=app[OBJECTS],
    )
    try:
        response = await proxied.serve(request)
        if object_id is not None and request.method == "DELETE" and response.status < 400:
            await app[OBJECTS].forget(object_id)
        return response
    finally:
        deadline.close()  # its timer, if any, goes with the request
        in_flight.dec()
        if admission is not None:
            limiter.release(
                admission, route.public_id, record.prompt_tokens or 0, record.completion_tokens or 0
            )


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
        for tail in FAMILIES:
            app.router.add_post(f"{prefix}/{tail}", proxy, expect_handler=expect_continue)
    # Everything else goes to the backend that owns the body's model.
    app.router.add_route("*", "/v1/{tail:.+}", proxy, expect_handler=expect_continue)
    app.router.add_route("*", "/{tail:.+}", proxy_unprefixed, expect_handler=expect_continue)

"""The backend's response on its way to the client: JSON rewritten, SSE relayed event by event."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.failover import Sent, is_event_stream, is_json_like
from gateway.observe import RequestRecord
from gateway.redact import Redactor
from gateway.rewrite import (
    ModelSwap,
    RewrittenEvent,
    dumps,
    loads,
    rewrite_event,
    rewrite_json_body,
    usage_of,
)
from gateway.routing import Hop
from gateway.upstream import BodyReader, Deadline, UpstreamError, read_chunks, returned_headers
from wire.errors import UPSTREAM_ERROR, error_payload
from wire.sse import EventTooLarge, SSESplitter, encode_data

UPSTREAM_MODEL_HEADER = "x-gateway-upstream-model"


def _headers(upstream: aiohttp.ClientResponse, hop: Hop) -> CIMultiDict[str]:
    headers = returned_headers(upstream.headers)
    headers[UPSTREAM_MODEL_HEADER] = hop.upstream_model
    return headers


async def relay(
    request: web.Request,
    sent: Sent,
    record: RequestRecord,
    deadline: Deadline,
    redactor: Redactor,
) -> web.StreamResponse:
    upstream, hop = sent.response, sent.hop
    record.upstream_status = upstream.status
    if is_event_stream(upstream):
        return await _relay_events(request, sent, record, deadline)
    if is_json_like(upstream):
        return await _relay_json(upstream, hop, record, sent.head, redactor)
    return await _relay_bytes(request, upstream, hop, record, _body(sent, deadline))


async def _body(sent: Sent, deadline: Deadline) -> AsyncIterator[bytes]:
    """The body: what was read ahead while choosing the backend, then the rest as it comes."""
    if sent.head:
        yield sent.head
    if not sent.complete:
        async for chunk in read_chunks(sent.response, sent.hop, deadline):
            yield chunk


async def _relay_json(
    upstream: aiohttp.ClientResponse,
    hop: Hop,
    record: RequestRecord,
    body: bytes,
    redactor: Redactor,
) -> web.Response:
    record.first_byte_at = time.monotonic()
    headers = _headers(upstream, hop)
    if upstream.status >= 400:
        # Backends sometimes echo the key they were given; it must not reach the client.
        body = redactor.redact_bytes(body)
        try:
            json.loads(body)
        except ValueError:
            # A proxy's HTML error page, say: wrap it so OpenAI clients can read it.
            text = body.decode("utf-8", "replace").strip()[:2000]
            message = f"backend for model '{hop.public_id}' answered {upstream.status}: {text}"
            body = json.dumps(
                error_payload(message, UPSTREAM_ERROR, None, "upstream_error")
            ).encode()
            headers["Content-Type"] = "application/json"
        return web.Response(status=upstream.status, body=body, headers=headers)
    rewritten = rewrite_json_body(body, hop.public_id)
    if rewritten.usage:
        record.prompt_tokens, record.completion_tokens = rewritten.usage
    if rewritten.upstream_model:
        headers[UPSTREAM_MODEL_HEADER] = rewritten.upstream_model
    return web.Response(status=upstream.status, body=rewritten.body, headers=headers)


async def _relay_events(
    request: web.Request, sent: Sent, record: RequestRecord, deadline: Deadline
) -> web.StreamResponse:
    upstream, hop = sent.response, sent.hop
    response = web.StreamResponse(status=upstream.status, headers=_headers(upstream, hop))
    response.headers["Cache-Control"] = "no-cache"
    # Tell an nginx in front of us not to buffer the stream either.
    response.headers["X-Accel-Buffering"] = "no"
    await response.prepare(request)
    record.streamed = True
    strip_usage = sent.usage_added
    public_id = hop.public_id
    swap = ModelSwap(public_id)
    splitter = SSESplitter()
    reader = None if sent.complete else BodyReader(upstream, hop, deadline)
    chunk = sent.head
    try:
        while True:
            if chunk:
                events = splitter.feed(chunk)
                # Events that arrived together leave together: one write (one send) per
                # network read, not per event. Nothing waits for more data.
                out = []
                for event in events:
                    swapped = swap.event(event)
                    if swapped is None:
                        rewritten = rewrite_event(event, public_id)
                        data, payload, source = rewritten.data, rewritten.payload, rewritten.source
                    else:
                        data, payload, source = swapped
                    # `usage` is read only where it can be: its key in the bytes, or escapes
                    # (find, not `in`: see rewrite._model_value).
                    if payload is not None and (
                        source.find(b'"usage"') != -1 or source.find(b"\\") != -1
                    ):
                        usage = usage_of(payload, source)
                        if usage:
                            record.prompt_tokens, record.completion_tokens = usage
                            if strip_usage:
                                kept = _without_usage(
                                    RewrittenEvent(data, payload, False, source), public_id
                                )
                                if kept is not None:
                                    out.append(kept)
                                continue
                    out.append(data)
                if events and record.first_byte_at is None:
                    record.first_byte_at = time.monotonic()
                if reader is None or reader.at_eof():
                    # The end is here already: the last events and the end of the chunked
                    # body leave in one write.
                    if splitter.pending.strip():
                        if out:
                            await response.write(b"".join(out))
                        break
                    await response.write_eof(b"".join(out))
                    return response
                if out:
                    await response.write(out[0] if len(out) == 1 else b"".join(out))
            if reader is None:
                break
            chunk = await reader.read()
            if not chunk:
                break
        if splitter.pending.strip():
            raise UpstreamError(
                "died",
                502,
                f"backend for model '{public_id}' ended the stream inside an event",
            )
    except EventTooLarge as exc:
        await _end_with_error(response, record, UpstreamError("event_too_large", 502, str(exc)))
        return response
    except UpstreamError as exc:
        await _end_with_error(response, record, exc)
        return response
    await response.write_eof()
    return response


def _without_usage(rewritten: RewrittenEvent, public_id: str) -> bytes | None:
    """The event as the client would have had it without the gateway's usage request: the
    usage-only chunk disappears, and a chunk that also carries choices loses its `usage`."""
    if not rewritten.payload.get("choices"):
        return None
    kept = _cut_usage(rewritten)
    if kept is not None:
        return b"data: " + kept + b"\n\n"
    payload = rewritten.exact_payload(public_id)
    return b"data: " + dumps({k: v for k, v in payload.items() if k != "usage"}) + b"\n\n"


def _cut_usage(rewritten: RewrittenEvent) -> bytes | None:
    """The event's JSON without its top-level `usage` member, cut out of the bytes; None
    unless the result reads as exactly the payload without `usage`."""
    payload, data = rewritten.payload, rewritten.data
    usage = payload.get("usage")
    if not isinstance(usage, dict) or not data.startswith(b"data: ") or data.count(b"\n") != 2:
        return None
    text = data[6:-2]
    try:
        member = b'"usage":' + orjson.dumps(usage)  # as compact encoders (and orjson) write it
    except TypeError:
        return None
    at = text.find(member)
    if at == -1 or text.find(member, at + 1) != -1:
        return None
    before, after = text[:at].rstrip(), text[at + len(member) :].lstrip()
    if before.endswith(b","):
        kept = before[:-1] + after
    elif after.startswith(b","):
        kept = before + after[1:]
    else:
        return None
    try:
        if loads(kept) != {k: v for k, v in payload.items() if k != "usage"}:
            return None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return kept


async def _end_with_error(
    response: web.StreamResponse, record: RequestRecord, exc: UpstreamError
) -> None:
    """End a stream that already started so that no client can take it for a finished one."""
    record.fail(exc.kind)
    await response.write(encode_data(error_payload(exc.message, UPSTREAM_ERROR, None, exc.kind)))
    await response.write_eof()


async def _relay_bytes(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    hop: Hop,
    record: RequestRecord,
    chunks: AsyncIterator[bytes],
) -> web.StreamResponse:
    """Audio, images and other bodies: passed through chunk by chunk, unchanged."""
    response = web.StreamResponse(status=upstream.status, headers=_headers(upstream, hop))
    await response.prepare(request)
    record.streamed = True
    try:
        async for chunk in chunks:
            if record.first_byte_at is None:
                record.first_byte_at = time.monotonic()
            await response.write(chunk)
    except UpstreamError as exc:
        # No in-band way to signal an error here: cut the connection so the body is seen
        # as truncated rather than complete.
        record.fail(exc.kind)
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response

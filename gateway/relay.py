"""The backend's response on its way to the client: JSON rewritten, SSE relayed event by event."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.buffered_read import take_buffered
from gateway.middleware import RequestRecord
from gateway.redact import Redactor
from gateway.resume import Splice, StreamWatch
from gateway.rewrite import (
    ModelSwap,
    RewrittenEvent,
    dumps,
    loads,
    response_id_of,
    rewrite_event,
    rewrite_json_body,
    usage_of,
)
from gateway.routing import Hop
from gateway.transport_relay import transport_pump
from gateway.upstream import BodyReader, Deadline, UpstreamError, read_chunks, returned_headers
from wire.errors import UPSTREAM_ERROR, error_payload
from wire.protocol import NO_BUFFERING
from wire.sse import EventTooLarge, SSESplitter, encode_data

UPSTREAM_MODEL_HEADER = "x-gateway-upstream-model"


@dataclass(slots=True)
class BackendAnswer:
    """A backend's response, status and headers in, and `head`, the body's start already
    read (a stream's first event, or a whole JSON body when `complete`)."""

    hop: Hop
    response: aiohttp.ClientResponse
    head: bytes
    complete: bool
    usage_added: bool = False  # the gateway asked for usage: the client must not see it


def is_event_stream(response: aiohttp.ClientResponse) -> bool:
    content_type = response.headers.get("Content-Type", "").lower()
    return content_type.startswith("text/event-stream") and response.status < 400


def is_json_like(response: aiohttp.ClientResponse) -> bool:
    return "json" in response.headers.get("Content-Type", "").lower() or response.status >= 400


def _headers(upstream: aiohttp.ClientResponse, hop: Hop) -> CIMultiDict[str]:
    headers = returned_headers(upstream.headers)
    headers[UPSTREAM_MODEL_HEADER] = hop.upstream_model
    return headers


async def relay(
    request: web.Request,
    answer: BackendAnswer,
    record: RequestRecord,
    deadline: Deadline,
    redactor: Redactor,
    on_created: Callable[[str], None] | None = None,
    watch: StreamWatch | None = None,
) -> web.StreamResponse:
    """The answer to the client, in the shape the backend's response calls for.
    `on_created` hears the id of a Responses API object the answer carries. With a `watch`
    (stream resume), a stream that fails raises StreamCut instead of ending."""
    upstream, hop = answer.response, answer.hop
    record.upstream_status = upstream.status
    if is_event_stream(upstream):
        return await _relay_events(request, answer, record, deadline, on_created, watch)
    if is_json_like(upstream):
        return await _relay_json(upstream, hop, record, answer.head, redactor, on_created)
    return await _relay_bytes(request, upstream, hop, record, _body(answer, deadline))


async def _body(answer: BackendAnswer, deadline: Deadline) -> AsyncIterator[bytes]:
    """The body: what was read ahead while choosing the backend, then the rest as it comes."""
    if answer.head:
        yield answer.head
    if not answer.complete:
        async for chunk in read_chunks(answer.response, answer.hop, deadline):
            yield chunk


async def _relay_json(
    upstream: aiohttp.ClientResponse,
    hop: Hop,
    record: RequestRecord,
    body: bytes,
    redactor: Redactor,
    on_created: Callable[[str], None] | None,
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
                error_payload(message, type_=UPSTREAM_ERROR, code="upstream_error")
            ).encode()
            headers["Content-Type"] = "application/json"
        return web.Response(status=upstream.status, body=body, headers=headers)
    rewritten = rewrite_json_body(body, hop.public_id)
    if rewritten.usage:
        record.prompt_tokens, record.completion_tokens = rewritten.usage
    if rewritten.upstream_model:
        headers[UPSTREAM_MODEL_HEADER] = rewritten.upstream_model
    if on_created is not None and rewritten.response_id is not None:
        on_created(rewritten.response_id)
    return web.Response(status=upstream.status, body=rewritten.body, headers=headers)


async def _relay_events(
    request: web.Request,
    answer: BackendAnswer,
    record: RequestRecord,
    deadline: Deadline,
    on_created: Callable[[str], None] | None,
    watch: StreamWatch | None,
) -> web.StreamResponse:
    upstream, hop = answer.response, answer.hop
    response = web.StreamResponse(status=upstream.status, headers=_headers(upstream, hop))
    # No caching, and tell an nginx in front of us not to buffer the stream either.
    response.headers.update(NO_BUFFERING)
    await response.prepare(request)
    record.streamed = True
    if watch is None:
        events = _EventRewriter(hop.public_id, record, answer.usage_added, on_created)
    else:
        events = _WatchedEvents(hop.public_id, record, answer.usage_added, watch)
    reader = None if answer.complete else BodyReader(upstream, hop, deadline)
    pump = _pump_events
    if reader is not None and watch is None and on_created is None:
        # The fast path (gateway.transport_relay), where it can take the stream over. Not
        # for a Responses API stream whose object is remembered: that task must start in the
        # request's context (its log lines carry the request id), not the connection's.
        pump = transport_pump(request, response, upstream) or _pump_events
    await _pump_or_cut(response, events, reader, answer.head, record, watch is not None, pump)
    return response


async def relay_continuation(
    response: web.StreamResponse,
    answer: BackendAnswer,
    record: RequestRecord,
    deadline: Deadline,
    watch: StreamWatch,
) -> None:
    """A resumed stream's next part, into the client's stream that is already open."""
    events = _WatchedEvents(answer.hop.public_id, record, answer.usage_added, watch)
    reader = None if answer.complete else BodyReader(answer.response, answer.hop, deadline)
    await _pump_or_cut(response, events, reader, answer.head, record, True)


class StreamCut(Exception):
    """A watched stream failed after its first byte: it may be resumed, or ended."""

    def __init__(self, response: web.StreamResponse, error: UpstreamError) -> None:
        super().__init__(error.message)
        self.response = response
        self.error = error


async def _pump_or_cut(
    response: web.StreamResponse,
    events: _EventRewriter,
    reader: BodyReader | None,
    head: bytes,
    record: RequestRecord,
    watched: bool,
    pump: Callable[..., Awaitable[None]] | None = None,
) -> None:
    try:
        await (pump or _pump_events)(response, events, reader, head)
        return
    except EventTooLarge as exc:
        error = UpstreamError("event_too_large", 502, str(exc))
    except UpstreamError as exc:
        error = exc
    if watched:
        raise StreamCut(response, error)
    await end_with_error(response, record, error)


async def _pump_events(
    response: web.StreamResponse,
    events: _EventRewriter,
    reader: BodyReader | None,
    chunk: bytes,
) -> None:
    """Events that arrived together leave together: one write (one send) per network read,
    not per event. Nothing waits for more data. The read is BodyReader.read's, inline: a
    paced stream makes one per event, and a coroutine call less each is measurable."""
    if reader is None:
        await events.end(response, events.feed(chunk) if chunk else b"")
        return
    content, deadline, idle = reader.content, reader.deadline, reader.idle
    while True:
        if chunk:
            out = events.feed(chunk)
            if content.at_eof():
                # The end is here already: the last events and the end of the chunked body
                # leave in one write.
                await events.end(response, out)
                return
            if out:
                await response.write(out)
        guarded = deadline.arm(idle)
        try:
            chunk = take_buffered(content) or await content.readany()
        except (asyncio.CancelledError, aiohttp.ClientError, OSError) as exc:
            error = reader.failure(exc, guarded)
            if error is None:
                raise
            raise error from None
        finally:
            if guarded:
                deadline.disarm()
        if not chunk:
            break
    await events.end(response, b"")


class _EventRewriter:
    """One stream's events on their way to the client: the public id put in, usage read,
    and what the gateway itself asked for taken out."""

    __slots__ = (
        "_on_created",
        "_public_id",
        "_record",
        "_splitter",
        "_strip_usage",
        "_swap",
        "_whole",
    )

    def __init__(
        self,
        public_id: str,
        record: RequestRecord,
        strip_usage: bool,
        on_created: Callable[[str], None] | None = None,
    ) -> None:
        self._on_created = on_created  # until the stream has named its response
        self._public_id = public_id
        self._record = record
        self._strip_usage = strip_usage
        self._swap = ModelSwap(public_id)
        self._splitter = SSESplitter()
        # A chunk that is one whole plain event may take ModelSwap.whole_event, which gives
        # what `_event` gives for it; not while a Responses stream has yet to name its object.
        self._whole = on_created is None

    def feed(self, chunk: bytes) -> bytes:
        """What to send for the events this chunk completes."""
        if self._whole and self._splitter.empty():
            out = self._swap.whole_event(chunk)
            if out is None:
                out = self._whole_events(chunk)
            if out is not None:
                record = self._record
                if record.first_byte_at is None:
                    record.first_byte_at = time.monotonic()
                return out
        events = self._splitter.feed(chunk)
        if not events:
            return b""
        out = [kept for event in events if (kept := self._event(event)) is not None]
        record = self._record
        if record.first_byte_at is None:
            record.first_byte_at = time.monotonic()
        return out[0] if len(out) == 1 else b"".join(out)

    def _whole_events(self, chunk: bytes) -> bytes | None:
        """Several whole plain events at once (`ModelSwap.whole_events`), their usage read as
        `_event` reads it; None where whole_events steps aside. Usage the gateway asked for
        is stripped by `_event`: from the first event that carries it (a stream's last but
        one), the rest of the chunk takes the general path."""
        found = self._swap.whole_events(chunk, self._strip_usage)
        if found is None:
            return None
        out, with_usage, end, stopped = found
        for payload, data in with_usage:
            self._note_usage(payload, data)
        if end == len(chunk):
            return out
        sent = [out]
        if stopped is not None:  # the event whose usage is stripped: parsed already
            payload, data = stopped
            event = chunk[end : end + len(data) + 8]  # `data: `, the JSON, LF LF
            end += len(event)
            swapped = self._swap.parsed_event(event, data, payload)
            kept = self._event(event) if swapped is None else self._kept(*swapped)
            if kept is not None:
                sent.append(kept)
        rest = self._splitter.feed(chunk[end:])
        sent += [kept for event in rest if (kept := self._event(event)) is not None]
        return b"".join(sent)

    def _event(self, event: bytes) -> bytes | None:
        swapped = self._swap.event(event)
        if swapped is None:
            rewritten = rewrite_event(event, self._public_id)
            return self._kept(rewritten.data, rewritten.payload, rewritten.source)
        return self._kept(*swapped)

    def _kept(self, data: bytes, payload: Any, source: bytes) -> bytes | None:
        """What to send for an event rewritten to `data` (its payload parsed from `source`,
        its JSON as the backend sent it): usage read, and stripped where the gateway asked."""
        if self._on_created is not None:
            self._created(payload)
        # `usage` is read only where it can be: its key in the bytes, or escapes
        # (find, not `in`: see rewrite._model_value).
        if payload is None or (source.find(b'"usage"') == -1 and source.find(b"\\") == -1):
            return data
        self._note_usage(payload, source)
        if self._strip_usage and payload.__class__ is dict and "usage" in payload:
            return _without_usage(RewrittenEvent(data, payload, source), self._public_id)
        return data

    def _note_usage(self, payload: Any, source: bytes) -> None:
        usage = usage_of(payload, source)
        if usage:
            self._record.prompt_tokens, self._record.completion_tokens = usage

    def _created(self, payload: Any) -> None:
        """`response.created`, the first event of a Responses API stream, names the object."""
        found = response_id_of(payload)
        if found is not None and self._on_created is not None:
            self._on_created(found)
            self._on_created = None
            self._whole = self.__class__ is _EventRewriter

    async def end(self, response: web.StreamResponse, out: bytes) -> None:
        """The backend's body is over: a stream cut inside an event is a dead one."""
        if self._splitter.pending.strip():
            if out:
                await response.write(out)
            raise UpstreamError(
                "died",
                502,
                f"backend for model '{self._public_id}' ended the stream inside an event",
            )
        await response.write_eof(out)


class _WatchedEvents(_EventRewriter):
    """A resumable stream's events: what the client is sent is taken note of (the text, the
    first chunk's id), and a continuation's chunks are spliced in as the same stream."""

    __slots__ = ("_watch",)

    def __init__(
        self, public_id: str, record: RequestRecord, strip_usage: bool, watch: StreamWatch
    ) -> None:
        super().__init__(public_id, record, strip_usage)
        self._watch = watch
        self._whole = False  # every event is observed (`_event`)

    def _event(self, event: bytes) -> bytes | None:
        watch = self._watch
        if watch.splice is not None:
            return self._spliced(event, watch.splice)
        data = super()._event(event)
        # A second parse, on resume routes only: the plain path does not keep its payload.
        payload = _event_payload(event)
        if payload is _DONE:
            watch.done = True
        elif data is not None:
            watch.so_far.observe(payload)
        return data

    def _spliced(self, event: bytes, splice: Splice) -> bytes | None:
        rewritten = rewrite_event(event, self._public_id)
        if rewritten.payload is None:
            if _event_payload(event) is _DONE:
                self._watch.done = True
            return rewritten.data
        payload = splice.chunk(rewritten.exact_payload(self._public_id))
        if payload is None:
            return None
        usage = payload.get("usage") if isinstance(payload, dict) else None
        if isinstance(usage, dict):
            found = usage_of(payload)
            if found:
                self._record.prompt_tokens, self._record.completion_tokens = found
        if self._strip_usage and isinstance(payload, dict) and "usage" in payload:
            if not payload.get("choices"):
                return None
            payload = {k: v for k, v in payload.items() if k != "usage"}
        self._watch.so_far.observe(payload)
        return b"data: " + dumps(payload) + b"\n\n"

    async def end(self, response: web.StreamResponse, out: bytes) -> None:
        """A watched stream is over only with its `[DONE]`: a backend whose connection
        closed cleanly before it (a process killed mid-write can look so) died."""
        if not self._watch.done and not self._splitter.pending.strip():
            if out:
                await response.write(out)
            raise UpstreamError(
                "died", 502, f"backend for model '{self._public_id}' ended the stream early"
            )
        await super().end(response, out)


_DONE = object()


def _event_payload(event: bytes) -> Any:
    """An event's JSON data, `_DONE` for `[DONE]`, None for anything else."""
    if event.startswith(b"data: ") and event.find(b"\n") == len(event) - 2:
        data = event[6:-2]  # the common event: one `data:` line
    else:
        data = b"".join(
            line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")
        )
    if data == b"[DONE]":
        return _DONE
    try:
        return loads(data) if data else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _without_usage(rewritten: RewrittenEvent, public_id: str) -> bytes | None:
    """The event as the client would have had it without the gateway's usage request: the
    usage-only chunk disappears, and a chunk that also carries choices loses its `usage`,
    whether counts or the `"usage": null` vLLM puts on every chunk once usage is asked for."""
    payload = rewritten.payload
    if payload.get("usage") is not None and not payload.get("choices"):
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
    if not data.startswith(b"data: ") or data.count(b"\n") != 2:
        return None
    text = data[6:-2]
    span = _usage_member(text, payload.get("usage"))
    if span is None:
        return None
    before, after = text[: span[0]].rstrip(), text[span[1] :].lstrip()
    if before.endswith(b","):
        kept = before[:-1] + after
    elif after.startswith(b","):
        kept = before + after[1:].lstrip()
    else:
        return None
    try:
        if loads(kept) != {k: v for k, v in payload.items() if k != "usage"}:
            return None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return kept


# `"usage": null`, however the backend spaced it.
_NULL_USAGE = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*null')


def _usage_member(text: bytes, usage: Any) -> tuple[int, int] | None:
    """Where the one top-level `usage` member is in the event's JSON, or None when it cannot
    be found for certain (the caller then checks the cut against the payload anyway)."""
    if usage is None:
        found = _NULL_USAGE.findall(text)
        match = _NULL_USAGE.search(text) if len(found) == 1 else None
        return None if match is None else match.span()
    if not isinstance(usage, dict):
        return None
    try:
        member = b'"usage":' + orjson.dumps(usage)  # as compact encoders (and orjson) write it
    except TypeError:
        return None
    at = text.find(member)
    if at == -1 or text.find(member, at + 1) != -1:
        return None
    return at, at + len(member)


async def end_with_error(
    response: web.StreamResponse, record: RequestRecord, exc: UpstreamError, counted: bool = False
) -> None:
    """End a stream that already started so that no client can take it for a finished one.
    `counted`: the failure is among the record's failures already (a resumed stream's seam)."""
    if counted:
        record.error = exc.kind
    else:
        record.fail(exc.kind)
    await response.write(
        encode_data(error_payload(exc.message, type_=UPSTREAM_ERROR, code=exc.kind))
    )
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

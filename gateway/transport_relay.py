"""The transport relay: a token stream's events relayed from inside the backend connection's
data callback, with no task wake-up and no `StreamResponse.write` per event.

The slow path (`relay._pump_events`) costs, per network read: aiohttp's client parser feeding
the response's StreamReader, the reader waking the handler task through a future, the task
resuming through `BodyReader.read` and the pump, and `StreamResponse.write` going down
aiohttp's writer to the client's transport. Here the reader is taken over (`_TappedReader`, its
class swapped in place, the `_Tap` in its waiter slot): what the parser feeds is rewritten by
the same `_EventRewriter` (model swap, usage read and stripped) inside the `data_received`
call, and written, framed as aiohttp's writer frames it (HTTP/1.1 chunked), to the client's
transport by one loop callback when that read is done (one write per read, as the pump
writes). The handler task sleeps until the stream ends, fails, or the client's transport asks
it to wait.

What stays aiohttp's: the backend connection, its parser and chunked decoding (llhttp, in C),
the connection's return to the pool when the body ended cleanly (the reader's end-of-body
callbacks run as before), the response headers (sent by `prepare()` and the first write), and
the end of the body (`write_eof`). Backpressure is the slow path's: while the client's
transport has paused writing, the reader is handed back, so it buffers up to its high-water
mark and then pauses the backend connection itself; the task waits for the client to drain,
relays what was buffered and takes the reader over again. Idle and total timeouts are the same
`Deadline`, restarted by every read. Not taken over (the slow path then): a resumable stream
(its watch parses every event), a Responses API stream whose object is remembered, a client
response that is compressed or has a length, and anything not built as this module expects
(aiohttp 3.14's StreamReader and StreamWriter, checked at takeover). Switched off by
`GATEWAY_TRANSPORT_RELAY=off`; tests/gateway/test_fast_path_equals_slow_transport_relay.py
compares the two paths byte for byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import ClientConnectionResetError, streams, web

from gateway.state import SETTINGS

if TYPE_CHECKING:
    import aiohttp

    from gateway.relay import _EventRewriter
    from gateway.upstream import BodyReader

# What wakes the handler task (the woken future's result).
_ENDED = "ended"  # the backend's body is over
_PAUSED = "paused"  # the client's transport asks the writer to wait
_CLIENT_GONE = "client_gone"  # the client's transport is closing

_CLOSING = "Cannot write to closing transport"  # aiohttp's own words for a gone client


def transport_pump(
    request: web.Request, response: web.StreamResponse, upstream: aiohttp.ClientResponse
) -> Callable[..., Awaitable[None]] | None:
    """The transport relay's pump for this stream, with `relay._pump_events`'s signature;
    None when the switch is off or the stream cannot be taken over (the slow path then)."""
    if not request.app[SETTINGS].transport_relay:
        return None
    writer = getattr(response, "_payload_writer", None)
    content = getattr(upstream, "content", None)
    transport = request.transport
    if (
        writer is None
        or transport is None
        or getattr(writer, "_compress", True) is not None
        or getattr(writer, "length", 0) is not None
        or type(content) is not streams.StreamReader
        or getattr(content, "_waiter", False) is not None
        or not hasattr(writer, "send_headers")
    ):
        return None
    return _TransportRelay(writer, content, transport).pump


class _TransportRelay:
    """One stream's takeover: the task's side (start, wait, backpressure, end)."""

    __slots__ = ("_content", "_transport", "_writer")

    def __init__(
        self, writer: Any, content: streams.StreamReader, transport: asyncio.Transport
    ) -> None:
        self._writer = writer
        self._content = content
        self._transport = transport

    async def pump(
        self,
        response: web.StreamResponse,
        events: _EventRewriter,
        reader: BodyReader | None,
        head: bytes,
    ) -> None:
        """As `relay._pump_events`: the first event (read ahead), then the rest as it comes,
        then the end of the body; UpstreamError or EventTooLarge when the backend fails."""
        assert reader is not None  # a complete answer is not taken over
        out = events.feed(head) if head else b""
        if out:
            await response.write(out)  # the headers and the first event, aiohttp's way
        writer = self._writer
        writer.send_headers()  # out before any byte the tap writes
        tap = _Tap(self._content, events, reader, self._transport, writer)
        loop = asyncio.get_running_loop()
        try:
            while True:
                tap.woken = woken = loop.create_future()
                outcome = tap.catch_up()
                if outcome is None:
                    tap.attach()
                    tap.waiting = True
                    try:
                        outcome = await reader.wait(woken)
                    finally:
                        tap.waiting = False
                elif isinstance(outcome, BaseException):
                    woken.set_exception(outcome)  # as the wait would have raised it
                    await reader.wait(woken)
                if outcome is _PAUSED:
                    await writer.drain()  # the client's transport has room again
                    continue
                if outcome is _CLIENT_GONE:
                    raise ClientConnectionResetError(_CLOSING)
                break
        finally:
            tap.detach()
        await events.end(response, b"")


class _TappedReader(streams.StreamReader):
    """The backend response's reader while the tap holds it (its class swapped in place, the
    tap in its waiter slot): what the parser feeds goes to the tap, not to the buffer. Its end
    (`feed_eof`) and its failure (`set_exception`) are the reader's own, which wake the waiter:
    the tap. (Not `read_nowait` from the waiter instead: it calls the protocol's
    `resume_reading`, which re-enters the parser from inside its own callback and broke the
    connection when tried.)"""

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        if data:
            self.total_bytes += len(data)
            self._waiter.fed(data)  # type: ignore[union-attr]
        return False

    def end_http_chunk_receiving(self) -> None:
        pass  # nothing reads chunk by chunk: no chunk ends to keep


class _Tap:
    """The stream's relay inside the backend connection's `data_received`: fed by the
    `_TappedReader`, woken by it (as a waiter future) at the end of the body or when it fails.
    It never raises into aiohttp's parser: whatever goes wrong hands the reader back and
    wakes the task with it."""

    __slots__ = (
        "_chunked",
        "_content",
        "_events",
        "_loop",
        "_pending",
        "_reader",
        "_transport",
        "_writer",
        "waiting",
        "woken",
    )

    def __init__(
        self,
        content: streams.StreamReader,
        events: _EventRewriter,
        reader: BodyReader,
        transport: asyncio.Transport,
        writer: Any,
    ) -> None:
        self._content = content
        self._events = events
        self._reader = reader
        self._transport = transport
        self._writer = writer
        self._chunked = bool(writer.chunked)
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] | None = None  # relayed, to be written at the read's end
        self.woken: asyncio.Future[str] | None = None
        self.waiting = False  # the task waits under the idle clock, which each read restarts

    def catch_up(self) -> str | BaseException | None:
        """In the task, before the tap holds the reader: relay what the reader buffered (before
        the takeover, or while the client was paused). None when the tap may take over."""
        content = self._content
        try:
            while chunk := content.read_nowait():
                out = self._events.feed(chunk)
                if out:
                    self._write(out)
        except _ClientGone:
            return _CLIENT_GONE
        except Exception as exc:
            return exc
        if content.is_eof():
            return _ENDED
        return _PAUSED if self._writer.protocol.writing_paused else None

    def attach(self) -> None:
        content = self._content
        content._waiter = self  # type: ignore[assignment]
        content.__class__ = _TappedReader

    def detach(self) -> None:
        """The reader is the reader's again: it buffers, and pauses the connection when full.
        What the tap relayed is written first: it came before whatever ends the stream."""
        content = self._content
        if content.__class__ is _TappedReader:
            content.__class__ = streams.StreamReader
        if content._waiter is self:
            content._waiter = None
        self._flush()

    def fed(self, data: bytes) -> None:
        """Bytes of the body, inside the parser: rewritten at once, and written when the
        parser is done with this read (a callback soon after), so that the events of one read
        leave in one write, as the event pump sends them; a paced event is one read."""
        try:
            out = self._events.feed(data)
        except Exception as exc:  # the rewriter's (EventTooLarge, say)
            self._wake(exc)
            return
        if self.waiting:
            self._reader.heard()
        if out:
            if self._pending is None:
                self._pending = [out]
                self._loop.call_soon(self._written)
            else:
                self._pending.append(out)

    def _written(self) -> None:
        """After the read: its events out, and the task woken if the client's transport is
        now full (the tap then lets the reader buffer, which pauses the connection)."""
        self._flush()
        if self._content.__class__ is _TappedReader and self._writer.protocol.writing_paused:
            self._wake(_PAUSED)

    def _flush(self) -> None:
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        try:
            self._write(pending[0] if len(pending) == 1 else b"".join(pending))
        except _ClientGone:
            self._wake(_CLIENT_GONE)

    # The future protocol, as StreamReader and aiohttp.helpers use its waiter.
    def done(self) -> bool:
        return False

    def set_result(self, _result: object) -> None:
        self._wake(_ENDED)  # fed data never wakes it: only the end of the body does

    def set_exception(self, exc: BaseException) -> None:
        self._wake(exc)

    def _write(self, out: bytes) -> None:
        transport = self._transport
        if transport.is_closing():
            raise _ClientGone
        size = len(out)
        self._writer.output_size += size
        transport.write(b"%x\r\n%b\r\n" % (size, out) if self._chunked else out)

    def _wake(self, outcome: str | BaseException) -> None:
        self.detach()
        woken = self.woken
        if woken is None or woken.done():
            return
        if isinstance(outcome, BaseException):
            woken.set_exception(outcome)
        else:
            woken.set_result(outcome)


class _ClientGone(Exception):
    """The client's transport is closing: nothing more is written to it."""

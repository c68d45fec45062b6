"""What the benchmarks share: the one fake backend, the canned answers it sends, the hold
result, and the statistics (one `percentile`, one `median`).

The fake backend is a raw asyncio protocol (on uvloop when installed), so that it costs far
less than any proxy measured in front of it; each bench runs it in a process of its own
(`<bench>.py --serve-backend PORT`). `POST /v1/chat/completions` answers a 495-byte chat
completion, or with `"stream": true` `STREAM_EVENTS` SSE events (one send() each) and
`data: [DONE]`. Request headers shape a stream:

- `X-Bench-Events: N`: N events instead of `STREAM_EVENTS`;
- `X-Bench-Interval: S`: one event every S seconds (the first at once). Without
  `X-Bench-Events` such a stream is held, its middle events repeated, until
  `POST /_release` ends every held stream normally (its last event, then [DONE]).
- `X-Bench-Stamp: 1` (paced streams): each event's text is the backend's CLOCK_MONOTONIC in
  nanoseconds when it was sent (`STAMP_MARK`, then 32 decimal digits), so that a client on the
  same machine reads each event's latency; the last event has a text too, as vLLM's may. The
  stamp is in the text, the one part of a real stream's chunks that changes from one to the
  next (their `id`, `created` and fingerprint are the stream's): 30 bytes more per event.

`POST /_chaos {"mode": M, "seconds": S}` makes it misbehave for S seconds (the soak's chaos):
`500`/`503` answer that status, `stall` accepts requests and sends nothing for
`STALL_HOLD` seconds (then 503), `midstream` lets paced streams go silent before their next
event and aborts them after `STALL_HOLD`, `cut` aborts them there, with no clean end.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import signal
import socket
import statistics
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

HOST = "127.0.0.1"
STREAM_EVENTS = 20
DONE = b"data: [DONE]\n\n"
EVENTS_HEADER = "X-Bench-Events"
INTERVAL_HEADER = "X-Bench-Interval"
STAMP_HEADER = "X-Bench-Stamp"
_CHUNK_ID = "chatcmpl-bench-4f1c2a9e8b7d6c5e4f3a2b1c0d9e8f7a"
# A stamped event's text: this, then the send time (time.monotonic_ns(), 32 digits).
STAMP_MARK = b'"content":"sent '
_STAMP_TEXT = "sent " + "0" * 32  # the placeholder the backend writes each stamp over
_STAMPED = STAMP_MARK + b"0" * 32
STALL_HOLD = 60.0  # how long a stalled backend holds a request before it drops it
CHAOS_MODES = {"ok", "500", "503", "stall", "midstream", "cut"}
_COMPACT = (",", ":")


# --------------------------------------------------------------------------------------------
# Canned answers
# --------------------------------------------------------------------------------------------


def completion_body(model: str) -> bytes:
    """A non-stream chat completion of about 500 bytes naming `model`."""
    payload = {
        "id": "chatcmpl-bench-4f1c2a9e8b7d6c5e4f3a2b1c0d9e8f7a",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "system_fingerprint": "fp_bench_0001",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! This is a canned answer from the benchmark's fake backend. "
                    "It is long enough to look like a short real reply, and the same every time.",
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 21, "completion_tokens": 38, "total_tokens": 59},
    }
    return json.dumps(payload, separators=_COMPACT).encode()


def chat_request_body(model: str, stream: bool) -> bytes:
    """The benches' request: a short chat, answered with `STREAM_EVENTS` events when streamed."""
    return json.dumps(
        {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Say hello in one sentence."},
            ],
            "max_tokens": 64,
            "stream": stream,
        },
        separators=_COMPACT,
    ).encode()


def stream_events(model: str, count: int, stamped: bool = False) -> list[bytes]:
    """`count` SSE chunk events of about 250 bytes each (the last one finishes, with usage);
    `stamped`: each one's text is the stamp's placeholder (`_STAMP_TEXT`)."""
    events = []
    for i in range(count):
        last = i == count - 1
        text = _STAMP_TEXT if stamped else None if last else f" word{i:02d}"
        chunk: dict[str, Any] = {
            "id": _CHUNK_ID,
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": model,
            "system_fingerprint": "fp_bench_0001",
            "choices": [
                {
                    "index": 0,
                    "delta": {} if text is None else {"content": text},
                    "logprobs": None,
                    "finish_reason": "stop" if last else None,
                }
            ],
        }
        if last:
            chunk["usage"] = {"prompt_tokens": 21, "completion_tokens": count, "total_tokens": 41}
        events.append(b"data: " + json.dumps(chunk, separators=_COMPACT).encode() + b"\n\n")
    return events


# --------------------------------------------------------------------------------------------
# The fake backend
# --------------------------------------------------------------------------------------------

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_MODEL = re.compile(rb'"model"\s*:\s*"([^"]{1,100})"')
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_HEADER_VALUE = re.compile(rb"\s*([0-9.]+)")
_EVENTS = EVENTS_HEADER.lower().encode() + b":"
_INTERVAL = INTERVAL_HEADER.lower().encode() + b":"
_STAMP = STAMP_HEADER.lower().encode() + b":"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _json_answer(status: int, payload: Any) -> bytes:
    body = json.dumps(payload).encode()
    return b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        len(body),
        body,
    )


def _chaos_error(status: int) -> bytes:
    message = f"fake backend chaos: {status}"
    error = {"message": message, "type": "server_error", "param": None, "code": None}
    return _json_answer(status, {"error": error})


class _Answers:
    """Responses per model, built once: the backend's steady state is a dict lookup and a few
    writes, so that it stays much cheaper than the proxies in front of it."""

    def __init__(self) -> None:
        self.plain: dict[bytes, bytes] = {}
        self.events: dict[tuple[bytes, int, bool], list[bytes]] = {}

    def completion(self, model: bytes) -> bytes:
        answer = self.plain.get(model)
        if answer is None:
            body = completion_body(model.decode())
            answer = self.plain[model] = (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        return answer

    def stream(self, model: bytes, count: int, stamped: bool = False) -> list[bytes]:
        """The head, then each event as one HTTP chunk, then [DONE] and the last chunk."""
        chunks = self.events.get((model, count, stamped))
        if chunks is None:
            head = (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            events = [_chunk(event) for event in stream_events(model.decode(), count, stamped)]
            chunks = [head, *events, _chunk(DONE) + b"0\r\n\r\n"]
            self.events[(model, count, stamped)] = chunks
        return chunks


class _Chaos:
    mode = "ok"
    until = 0.0

    @classmethod
    def now(cls) -> str:
        return cls.mode if time.monotonic() < cls.until else "ok"


class BackendProtocol(asyncio.Protocol):
    answers = _Answers()
    held: set[BackendProtocol] = set()  # one backend per process

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None
        self.chunks: list[bytes] = []
        self.sent = 0  # chunks written, the head included
        self.interval = 0.0
        self.held_open = False
        self.stamped = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, and set TCP_NODELAY.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.held.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = _CONTENT_LENGTH.search(head)
            total = end + 4 + (int(length.group(1)) if length else 0)
            if len(self.buffer) < total:
                return
            body = self.buffer[end + 4 : total]
            self.buffer = self.buffer[total:]
            self.respond(head, body)

    def respond(self, head: bytes, body: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if head.startswith(b"POST /_release "):
            released = list(self.held)
            for stream in released:
                stream.finish()
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (
                len(str(len(released))), len(released)))  # fmt: skip
            return
        if head.startswith(b"POST /_chaos "):
            transport.write(self.set_chaos(body))
            return
        if not head.startswith(b"POST"):
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return
        chaos = _Chaos.now()
        if chaos in ("500", "503"):
            transport.write(_chaos_error(int(chaos)))
            return
        if chaos == "stall":  # accepted, and nothing sent: the gateway must give up on its own
            self.timer = asyncio.get_running_loop().call_later(
                STALL_HOLD, transport.write, _chaos_error(503)
            )
            return
        found = _MODEL.search(body)
        model = found.group(1) if found else b"unknown"
        if not _STREAM.search(body):
            transport.write(self.answers.completion(model))
            return
        lowered = head.lower()
        count = int(_header_number(lowered, _EVENTS))
        interval = min(_header_number(lowered, _INTERVAL), 60.0)
        # Stamps are read per event: only in a paced stream of a known length.
        stamped = bool(interval and count and _header_number(lowered, _STAMP))
        events = min(max(count, 1), 10_000) if count else STREAM_EVENTS
        chunks = self.answers.stream(model, events, stamped)
        if _CONTINUED.search(body):
            # Stream resume's continuation: the events the client has are left out.
            given = min(continued_events(body), len(chunks) - 3)
            chunks = [chunks[0], *chunks[1 + given :]]
        if not interval:
            # As fast as it can, but one send() per event, as a model server flushes each one.
            for chunk in chunks:
                transport.write(chunk)
            return
        # Paced: the head and the first event now, then one event every `interval` s.
        self.chunks, self.interval, self.held_open = chunks, interval, not count
        self.stamped = stamped
        if self.held_open:
            self.held.add(self)
        transport.write(chunks[0])
        self.sent = 1
        self.tick()

    def set_chaos(self, body: bytes) -> bytes:
        try:
            asked = json.loads(body)
            mode, seconds = str(asked["mode"]), float(asked.get("seconds", 0))
        except (ValueError, KeyError, TypeError):
            mode, seconds = "", 0.0
        if mode not in CHAOS_MODES:
            return _json_answer(400, {"error": "unknown mode"})
        _Chaos.mode, _Chaos.until = mode, time.monotonic() + min(max(seconds, 0.0), 600.0)
        return _json_answer(200, {"mode": mode})

    def tick(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            self.held.discard(self)
            return
        chaos = _Chaos.now()
        if chaos == "cut":  # never a clean end: no last chunk
            transport.abort()
            return
        if chaos == "midstream":  # the headers and some events, then silence
            self.timer = asyncio.get_running_loop().call_later(STALL_HOLD, transport.abort)
            return
        chunks = self.chunks
        if self.held_open:
            # The middle events over and over: the first and the last are sent once.
            transport.write(chunks[1 + (self.sent - 1) % (len(chunks) - 3)])
        else:
            chunk = chunks[self.sent]
            if self.stamped:
                chunk = chunk.replace(_STAMPED, STAMP_MARK + b"%032d" % time.monotonic_ns(), 1)
            transport.write(chunk)
            if self.sent == len(chunks) - 2:  # the last event: [DONE] and the end at once
                transport.write(chunks[-1])
                return
        self.sent += 1
        self.timer = asyncio.get_running_loop().call_later(self.interval, self.tick)

    def finish(self) -> None:
        self.held.discard(self)
        self._cancel_timer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.chunks[-2] + self.chunks[-1])

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


_CONTINUED = re.compile(rb'"continue_final_message"\s*:\s*true')


def continued_events(body: bytes) -> int:
    """How many content events a continuation request (stream resume, with
    `continue_final_message`) says the client has: its last message holds their text,
    ` word00 word01 ...`."""
    try:
        content = json.loads(body)["messages"][-1].get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return 0
    return str(content or "").count(" word")


def _header_number(head: bytes, name: bytes) -> float:
    start = head.find(b"\r\n" + name)
    if start < 0:
        return 0.0
    found = _HEADER_VALUE.match(head, start + 2 + len(name))
    return float(found.group(1)) if found else 0.0


async def serve_backend(port: int, reuse_port: bool = False) -> None:
    """Serve the fake backend on HOST:port until SIGINT or SIGTERM. `reuse_port`: several
    backend processes share the port (SO_REUSEPORT), when one core cannot feed the load."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        BackendProtocol, HOST, port, backlog=4096, reuse_address=True, reuse_port=reuse_port or None
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        print("ready", flush=True)
        await stop.wait()


async def serve_until_signalled(app: Any, port: int, announce: bool = False) -> None:
    """Serve the aiohttp `app` on HOST:port until SIGINT or SIGTERM (an aiohttp fake backend's
    life, for the benches whose backends model more than bytes: routing_sim's replicas)."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port, backlog=2048, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if announce:
        print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run on uvloop when it is installed (it is, in the repo's venv)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Holding many streams open, and statistics
# --------------------------------------------------------------------------------------------


@dataclass
class HoldResult:
    """Many slow streams held open at once through a proxy, and what that cost it."""

    streams: int
    completed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    peak_open: int = 0
    all_open_after_s: float = math.nan
    rss_before_kib: int = 0
    rss_all_open_kib: int = 0
    rss_held_kib: int = 0  # after the hold with all of them open
    rss_peak_kib: int = 0
    rss_after_kib: int = 0
    proxy_cpu_s: float = 0.0
    seconds: float = 0.0


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (the smallest value with at least p % of them at or below
    it); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def median(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan

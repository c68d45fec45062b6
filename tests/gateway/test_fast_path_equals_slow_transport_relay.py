"""The transport relay (gateway.transport_relay) gives every client exactly what the event pump
gives: the same bytes, the same usage counted, over randomized streams from a raw backend whose
bytes arrive in arbitrary pieces (events, HTTP chunks and UTF-8 characters split across reads),
chunked, with a length or closed at the end, cut or not."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from gateway import transport_relay
from gateway.state import Settings
from tests.gateway.waiting import settled

PUBLIC_IDS = ("m", "a-much-longer-public-model-name-for-the-swap", "modèle-é")
UPSTREAM_MODELS = ("real", "r", "meta-llama/Meta-Llama-3-8B-Instruct-" + "x" * 30, "modèle", 'q"t')
TEXTS = ("Hello", " wörld", " 😀", " 世界", "", " \\n", ' "quoted"', "é" * 40)
STREAMS = 150


@dataclass
class _Script:
    """One response, as raw bytes, and how it is cut into the writes the backend makes."""

    pieces: list[bytes]
    abort: bool = False  # the connection is reset after the last piece
    close: bool = False  # the body ends with the connection (no length, not chunked)


@dataclass
class RawBackend:
    """A backend on loopback that answers every request with the current script, one piece per
    write and a few loop turns between writes, so that the gateway reads it in pieces."""

    script: _Script | None = None
    server: asyncio.Server | None = None
    streams: int = 0
    written: int = 0  # bytes written, over every response
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def start(self) -> RawBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                script = self.script
                assert script is not None
                self.streams += 1
                for piece in script.pieces:
                    writer.write(piece)
                    await writer.drain()
                    self.written += len(piece)
                    for _ in range(random.randint(1, 3)):
                        await asyncio.sleep(0)
                if script.abort:
                    writer.transport.abort()
                    return
                if script.close:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def _event(rng: random.Random, model: str, usage: str) -> bytes:
    """One SSE event of a kind a backend may send."""
    kind = rng.random()
    if kind < 0.06:
        return b": keep-alive\n\n"
    if kind < 0.1:
        return b"data: {not json\n\n"
    chunk: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": rng.choice(TEXTS)}, "finish_reason": None}],
    }
    if usage == "null":
        chunk["usage"] = None
    data = json.dumps(chunk, ensure_ascii=rng.random() < 0.3)
    if kind < 0.14:
        return b"event: message\ndata: " + data.encode() + b"\n\n"
    if kind < 0.18:
        return b"data: " + data.encode() + b"\r\n\r\n"
    if kind < 0.21:  # the JSON over two data lines
        text = data.encode()
        return b"data: " + text[:10] + b"\ndata: " + text[10:] + b"\n\n"
    return b"data: " + data.encode() + b"\n\n"


def _usage_event(rng: random.Random, model: str) -> bytes:
    usage = {"prompt_tokens": rng.randint(1, 500), "completion_tokens": rng.randint(1, 900)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    choices: list[Any] = []
    if rng.random() < 0.3:  # usage on a chunk that also carries choices
        choices = [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
            "model": model, "choices": choices, "usage": usage}  # fmt: skip
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _body(rng: random.Random) -> tuple[bytes, str]:
    """The SSE body of one stream, and how it ends: `clean`, `cut` inside an event (reset),
    or `short` (a clean end of the body inside an event)."""
    model = rng.choice(UPSTREAM_MODELS)
    usage = rng.choice(("none", "last", "null"))
    events = [_event(rng, model, usage) for _ in range(rng.randint(1, 25))]
    if usage != "none":
        events.append(_usage_event(rng, model))
    ending = rng.choices(("clean", "cut", "short"), (8, 1, 1))[0]
    if ending == "clean":
        events.append(b"data: [DONE]\n\n")
    else:
        events.append(b'data: {"id":"chatcmpl-1","choices":[{"delta":{"content":"cut')
    return b"".join(events), ending


def _framed(rng: random.Random, body: bytes, ending: str) -> tuple[bytes, bool]:
    """The whole response as the backend writes it: chunked (HTTP chunks of random sizes),
    with a Content-Length, or delimited by the connection's close; and whether it aborts."""
    framing = rng.choices(("chunked", "length", "close"), (6, 2, 2))[0]
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    if framing == "chunked":
        out, at = [], 0
        while at < len(body):
            size = rng.choice((1, 2, 7, 64, 255, 4096, rng.randint(1, 400)))
            piece = body[at : at + size]
            out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
            at += size
        terminal = b"0\r\n\r\n" if ending != "cut" else b""
        payload = head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(out) + terminal
    elif framing == "length":
        declared = len(body) + (50 if ending == "cut" else 0)
        payload = head + b"Content-Length: %d\r\n\r\n" % declared + body
    else:
        payload = head + b"Connection: close\r\n\r\n" + body
    return payload, ending == "cut" or (framing == "length" and ending == "cut")


def _pieces(rng: random.Random, payload: bytes) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(payload)), min(len(payload) - 1, rng.randint(2, 40))))
    return [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]


def _config(backend: RawBackend) -> dict[str, Any]:
    endpoint = {"url": backend.url, "actualModelName": "real", "timeouts": {"idle": 30}}
    return {"endpoints": {public: endpoint for public in PUBLIC_IDS}}


def _tokens(metrics: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("gateway_tokens_total{")
    }


@pytest.fixture
async def raw_backend() -> AsyncIterator[RawBackend]:
    backend = await RawBackend().start()
    yield backend
    assert backend.server is not None
    backend.server.close()


async def test_transport_relay_gives_what_the_event_pump_gives(
    make_gateway, raw_backend: RawBackend, http: aiohttp.ClientSession, monkeypatch
) -> None:
    taken_over = 0
    pump = transport_relay._TransportRelay.pump

    async def counted(self: Any, *args: Any) -> None:
        nonlocal taken_over
        taken_over += 1
        await pump(self, *args)

    monkeypatch.setattr(transport_relay._TransportRelay, "pump", counted)
    fast = await make_gateway(_config(raw_backend), Settings(transport_relay=True), "fast.json")
    slow = await make_gateway(_config(raw_backend), Settings(transport_relay=False), "slow.json")
    rng = random.Random(1717)
    for number in range(STREAMS):
        body, ending = _body(rng)
        payload, abort = _framed(rng, body, ending)
        close = b"\r\nConnection: close\r\n" in payload.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        raw_backend.script = _Script(_pieces(rng, payload), abort, close)
        request = {"model": rng.choice(PUBLIC_IDS), "stream": True}
        if rng.random() < 0.3:
            request["stream_options"] = {"include_usage": True}
        answers = []
        for gateway in (fast, slow):
            async with asyncio.timeout(10):  # a guard: a stream that hangs fails here
                url = f"{gateway.url}/v1/chat/completions"
                async with http.post(url, json=request) as response:
                    answers.append((response.status, response.content_type, await response.read()))
        assert answers[0] == answers[1], (number, ending, payload[:300])
    assert raw_backend.streams == 2 * STREAMS
    # Most streams arrive in more than one read: the fast path took those over.
    assert taken_over > STREAMS // 2, taken_over
    fast_tokens = _tokens(await (await http.get(f"{fast.url}/metrics")).text())
    slow_tokens = _tokens(await (await http.get(f"{slow.url}/metrics")).text())
    assert fast_tokens == slow_tokens
    assert sum(fast_tokens.values()) > 0


async def _read_late(port: int, request: dict[str, Any], backend: RawBackend) -> bytes:
    """The response's body through a client with a small receive window that reads nothing
    until the backend's writes have stalled: the gateway's transport pauses on the way."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
    body = json.dumps(request).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await settled(lambda: backend.written)
    raw = await reader.read()  # to the end: the gateway closes after the response
    writer.close()
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    out, at = bytearray(), 0
    while True:
        end = chunked.index(b"\r\n", at)
        size = int(chunked[at:end], 16)
        if not size:
            return bytes(out)
        out += chunked[end + 2 : end + 2 + size]
        at = end + 4 + size


async def test_transport_relay_under_backpressure_gives_what_the_event_pump_gives(
    make_gateway, raw_backend: RawBackend, monkeypatch
) -> None:
    """A client that stops reading: the relay leaves the reader to buffer (and pause the backend
    connection) while the client's transport is paused, then relays what it buffered; the
    bytes are the event pump's."""
    woken: list[object] = []
    wake = transport_relay._Tap._wake

    def seen(self: Any, outcome: Any) -> None:
        woken.append(outcome)
        wake(self, outcome)

    monkeypatch.setattr(transport_relay._Tap, "_wake", seen)
    fast = await make_gateway(_config(raw_backend), Settings(transport_relay=True), "fast.json")
    slow = await make_gateway(_config(raw_backend), Settings(transport_relay=False), "slow.json")
    rng = random.Random(99)
    for _ in range(2):
        events = [  # some 12 MB: more than the sockets between backend and client hold
            b'data: {"model":"real","choices":[{"delta":{"content":"%s"}}]}\n\n'
            % ("é" * rng.randint(1, 80_000)).encode()
            for _ in range(150)
        ]
        body = b"".join(events) + _usage_event(rng, "real") + b"data: [DONE]\n\n"
        payload, _ = _framed(rng, body, "clean")
        close = b"\r\nConnection: close\r\n" in payload.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        raw_backend.script = _Script(_pieces(rng, payload), False, close)
        request = {"model": "m", "stream": True}
        async with asyncio.timeout(30):  # a guard: a stream that hangs fails here
            answers = [await _read_late(gw.port, request, raw_backend) for gw in (fast, slow)]
        assert answers[0] == answers[1]
        assert answers[0].endswith(b"data: [DONE]\n\n")
    assert transport_relay._PAUSED in woken


def test_the_switch_reads_on_and_off() -> None:
    assert Settings().transport_relay is True
    assert Settings.from_env({}).transport_relay is True
    assert Settings.from_env({"GATEWAY_TRANSPORT_RELAY": ""}).transport_relay is True  # unset
    for off in ("off", "OFF", "false", "0"):
        assert Settings.from_env({"GATEWAY_TRANSPORT_RELAY": off}).transport_relay is False
    for on in ("on", "true", "1"):
        assert Settings.from_env({"GATEWAY_TRANSPORT_RELAY": on}).transport_relay is True
    with pytest.raises(ValueError, match="on or off"):
        Settings.from_env({"GATEWAY_TRANSPORT_RELAY": "fast"})


async def test_a_resumable_stream_takes_the_event_pump(
    make_gateway, raw_backend: RawBackend, http: aiohttp.ClientSession, monkeypatch
) -> None:
    """Stream resume watches every event it relays (gateway.resume): the transport relay
    leaves such a stream to the event pump, which the resume tests pin down."""
    taken_over = 0
    pump = transport_relay._TransportRelay.pump

    async def counted(self: Any, *args: Any) -> None:
        nonlocal taken_over
        taken_over += 1
        await pump(self, *args)

    monkeypatch.setattr(transport_relay._TransportRelay, "pump", counted)
    config = _config(raw_backend)
    config["endpoints"]["m"] = {**config["endpoints"]["m"], "resume": True}
    gateway = await make_gateway(config)
    rng = random.Random(5)
    events = b"".join(_event(rng, "real", "none") for _ in range(30)) + b"data: [DONE]\n\n"
    payload, _ = _framed(rng, events, "clean")
    close = b"\r\nConnection: close\r\n" in payload.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    for model, fast in (("m", 0), ("modèle-é", 1)):
        raw_backend.script = _Script(_pieces(rng, payload), False, close)
        request = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(f"{gateway.url}/v1/chat/completions", json=request) as response:
            assert (await response.read()).endswith(b"data: [DONE]\n\n")
        assert taken_over == fast

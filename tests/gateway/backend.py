"""A real aiohttp server on loopback standing in for a model backend, recording what it got."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


BackendHandler = Callable[[web.Request, Received], Awaitable[web.StreamResponse]]


def chat_completion(model: str, content: str = "Hello!") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }


def chunk(model: str, content: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def start_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    return response


async def default_handler(request: web.Request, received: Received) -> web.StreamResponse:
    """Behaves like an OpenAI-compatible server, echoing the model name it was sent."""
    payload = received.json() if received.body else {}
    model = payload.get("model", "?")
    if request.path.endswith("/embeddings"):
        inputs = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
        return web.json_response(
            {
                "object": "list",
                "model": model,
                "data": [
                    {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                    for i, _ in enumerate(inputs)
                ],
                "usage": {"prompt_tokens": 4, "total_tokens": 4},
            }
        )
    if request.path.endswith("/completions") and not request.path.endswith("chat/completions"):
        body = {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1700000000,
            "model": model,
            "choices": [{"index": 0, "text": " world", "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        }
        if payload.get("stream"):
            response = await start_sse(request)
            await response.write(sse(body))
            await response.write(b"data: [DONE]\n\n")
            return response
        return web.json_response(body)
    if payload.get("stream"):
        response = await start_sse(request)
        for word in ("Hel", "lo", "!"):
            await response.write(sse(chunk(model, word)))
        await response.write(sse(chunk(model, None, "stop")))
        if (payload.get("stream_options") or {}).get("include_usage"):
            usage = {**chunk(model, None), "choices": []}
            usage["usage"] = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
            await response.write(sse(usage))
        await response.write(b"data: [DONE]\n\n")
        return response
    return web.json_response(chat_completion(model))


@dataclass
class FakeBackend:
    """Start with `await backend.start()`; set `handler` to script its behaviour."""

    handler: BackendHandler = default_handler
    received: list[Received] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    host: str = "127.0.0.1"  # any 127.0.0.x: several backends can share one port
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def last(self) -> Received:
        return self.received[-1]

    async def start(self) -> FakeBackend:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # Like a real model server, notice a client that went away.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        received = Received(
            request.method,
            request.path,
            request.query_string,
            dict(request.headers),
            await request.read(),
        )
        self.received.append(received)
        try:
            return await self.handler(request, received)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def ok_after(seconds: float, model: str = "m") -> web.Response:
    """A plain completion answered after `seconds`."""
    await asyncio.sleep(seconds)
    return web.json_response({"model": model, "choices": [], "object": "chat.completion"})


def answering(status: int, headers: dict[str, str] | None = None) -> BackendHandler:
    """A handler that answers every request with `status` and an OpenAI-shaped error."""

    async def handler(request: web.Request, received: Received) -> web.Response:
        body = {
            "error": {"message": f"backend says {status}", "type": "x", "param": None, "code": None}
        }
        return web.json_response(body, status=status, headers=headers or {})

    return handler


async def slow_stream(request: web.Request, received: Received) -> web.StreamResponse:
    """Five chunks 0.1 s apart: keeps the backend busy for half a second."""
    response = await start_sse(request)
    for _ in range(5):
        await response.write(sse(chunk("m", "x")))
        await asyncio.sleep(0.1)
    await response.write(b"data: [DONE]\n\n")
    return response

"""A deterministic fake engine for stream resume, on loopback: its answer is a fixed function
of the conversation, and a partial assistant message (or a prompt followed by text) is
continued from exactly where it stops. It can be told to die mid-stream.

In-process: `await StoryBackend().start()`. As a process of its own (to be killed):
`python -m tests.gateway.story --port P`; `POST /_script` sets what `StoryBackend` has as
attributes, and `GET /_stats` says how many streams it has started."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PIECES = 30  # pieces of an answer unless the seed asks for a number (`... 40`)
_COUNT = re.compile(r"(\d+)\s*$")


def story(seed: str) -> list[str]:
    """The whole answer to `seed`, in the pieces it is streamed in (one per "token")."""
    match = _COUNT.search(seed)
    count = int(match.group(1)) if match else PIECES
    return [
        hashlib.sha256(f"{seed}/{i}".encode()).hexdigest()[: 2 + i % 5] + " " for i in range(count)
    ]


def story_text(seed: str) -> str:
    return "".join(story(seed))


def completion_prompt(seed: str) -> str:
    """The prompt that asks /v1/completions for `seed`'s story: the story follows the newline."""
    return seed + "\n"


def _remaining(seed: str, done: str) -> list[str] | None:
    """The pieces after `done`, the part already given; None if `done` is not its start."""
    text = story_text(seed)
    if not text.startswith(done):
        return None
    pieces, at = [], 0
    for piece in story(seed):
        end = at + len(piece)
        if end > len(done):
            pieces.append(piece[max(0, len(done) - at) :])
        at = end
    return pieces


def _seed_and_done(path: str, payload: dict[str, Any]) -> tuple[str, str]:
    if path.endswith("chat/completions"):
        messages = payload["messages"]
        if payload.get("continue_final_message"):
            return messages[-2]["content"], messages[-1]["content"]
        return messages[-1]["content"], ""
    prompt = payload["prompt"]
    prompt = prompt[0] if isinstance(prompt, list) else prompt
    seed, _, done = prompt.partition("\n")
    return seed, done


@dataclass
class Script:
    """What the backend does to the streams it starts (a process gets it by `/_script`)."""

    die_after: int | None = None  # pieces sent, then the stream dies
    die_how: str = "cut"  # cut (connection reset), torn (half an event, then cut), stall
    dying_streams: int = 1_000_000  # how many streams die; the rest are served whole
    fail_status: int | None = None  # answer every request with this error status
    interval: float = 0.0  # seconds between pieces
    extra_delta: dict[str, Any] = field(default_factory=dict)  # merged into the 2nd delta


@dataclass
class StoryBackend:
    script: Script = field(default_factory=Script)
    received: list[dict[str, Any]] = field(default_factory=list)
    started_streams: int = 0
    pieces_sent: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/_script", self._set_script)
        app.router.add_get("/_stats", self._stats)
        app.router.add_get("/v1/models", self._models)
        return app

    async def start(self) -> StoryBackend:
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _set_script(self, request: web.Request) -> web.Response:
        self.script = Script(**await request.json())
        return web.json_response({"ok": True})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"started": self.started_streams, "pieces": self.pieces_sent})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "story", "object": "model"}]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        self.received.append(payload)
        script = self.script
        if script.fail_status is not None:
            error = {"message": "scripted", "type": "server_error", "param": None, "code": None}
            return web.json_response({"error": error}, status=script.fail_status)
        chat = request.path.endswith("chat/completions")
        seed, done = _seed_and_done(request.path, payload)
        pieces = _remaining(seed, done)
        if pieces is None:
            error = {"message": "not my story", "type": "invalid_request_error"}
            return web.json_response({"error": {**error, "param": None, "code": None}}, status=400)
        limit = payload.get("max_completion_tokens") or payload.get("max_tokens")
        finish = "stop"
        if isinstance(limit, int) and limit < len(pieces):
            pieces, finish = pieces[:limit], "length"
        self.started_streams += 1
        dies = script.die_after is not None and script.dying_streams > 0
        if dies:
            script.dying_streams -= 1
        return await _stream(request, self, chat, payload, pieces, finish, script if dies else None)


def _chunk(chat: bool, model: str, text: str | None, finish: str | None) -> dict[str, Any]:
    if chat:
        delta = {} if text is None else {"content": text}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        kind = "text_completion"
    # Every stream has its own id and time: the gateway must keep the first stream's.
    ident = hashlib.sha256(repr(asyncio.get_running_loop().time()).encode()).hexdigest()[:12]
    return {
        "id": f"story-{ident}",
        "object": kind,
        "created": int(asyncio.get_running_loop().time()),
        "model": model,
        "system_fingerprint": f"fp-{ident[:4]}",
        "choices": [choice],
    }


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def _stream(
    request: web.Request,
    backend: StoryBackend,
    chat: bool,
    payload: dict[str, Any],
    pieces: list[str],
    finish: str,
    dying: Script | None,
) -> web.StreamResponse:
    model = str(payload.get("model"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    first = _chunk(chat, model, "", None)
    ids = {k: first[k] for k in ("id", "created", "system_fingerprint")}
    if chat:
        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        await response.write(_sse(first))
    for i, piece in enumerate(pieces):
        if dying is not None and i == dying.die_after:
            await _die(request, response, dying)
            return response
        if dying is None and backend.script.interval:
            await asyncio.sleep(backend.script.interval)
        elif dying is not None and dying.interval:
            await asyncio.sleep(dying.interval)
        chunk = {**_chunk(chat, model, piece, None), **ids}
        if i == 1 and backend.script.extra_delta and chat:
            chunk["choices"][0]["delta"].update(backend.script.extra_delta)
        await response.write(_sse(chunk))
        backend.pieces_sent += 1
    await response.write(_sse({**_chunk(chat, model, None, finish), **ids}))
    if (payload.get("stream_options") or {}).get("include_usage"):
        # 10 for the question, one per piece of the partial answer it was given.
        prompt_tokens = 10 + _seed_and_done(request.path, payload)[1].count(" ")
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces)}
        usage["total_tokens"] = usage["prompt_tokens"] + len(pieces)
        await response.write(_sse({**_chunk(chat, model, None, None), **ids, "choices": [],
                                   "usage": usage}))  # fmt: skip
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _die(request: web.Request, response: web.StreamResponse, script: Script) -> None:
    if script.die_how == "stall":
        await asyncio.sleep(3600)
    if script.die_how == "torn":
        await response.write(b'data: {"id": "half an ev')
    if request.transport is not None:
        request.transport.abort()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(StoryBackend().app(), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()

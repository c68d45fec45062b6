"""Stream resume exactness: how often a greedy stream cut at a random point and resumed by
the gateway gives the same text as the stream that was never cut.

Run from the repository root (by hand; it is not a test):

    .venv/bin/python bench/resume_exactness.py [--cuts 200] [--tokens 48]

It starts the demo worker (`python -m worker --model demo`, a random-weight Llama) or uses
`--worker-url`, and in this process the real gateway and a cutting proxy on loopback. The
gateway's model `demo` has `"resume": true` and two backends in priority order: the cutting
proxy in front of the worker, then the worker itself. For each cut, a prompt's uninterrupted
greedy stream (temperature 0, `ignore_eos`) is read straight from the worker; then the same
request goes through the gateway with `X-Cut-After: k` (k drawn from 1 .. events - 1): the
proxy relays k content events and resets the connection, and the gateway resumes the stream
on the worker, which continues the partial text (chat: `continue_final_message`;
completions: the prompt followed by the text). Half the cuts are chat, half completions.

It prints how many resumed texts equal the uninterrupted ones and, for those that differ,
whether the text before the seam re-tokenizes to other tokens than the model generated (the
limit of text-level continuation: the continuation is conditioned on the re-tokenized text).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the gateway is imported from the checkout

CUT_HEADER = "X-Cut-After"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(cache: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "WORKER_CACHE_DIR": cache, "TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "--model", "demo", "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "1024", "--kv-cache-tokens", "8192"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the worker exited while starting")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if json.load(r).get("status") == "ok":
                    return proc, f"{url}/v1"
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the worker did not become ready")


def cutting_proxy(worker: str, session: aiohttp.ClientSession) -> web.Application:
    """Relays to the worker; with `X-Cut-After: k`, resets the connection after k events
    that carry text (the first part of a stream the gateway then resumes)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        cut_after = int(request.headers.get(CUT_HEADER, "0"))
        url = f"{worker}/{request.match_info['tail']}"
        headers = {"Content-Type": "application/json"}
        async with session.post(url, data=body, headers=headers) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                "Content-Type": upstream.headers.get("Content-Type", "")})  # fmt: skip
            await response.prepare(request)
            sent = 0
            buffer = b""
            async for chunk in upstream.content.iter_any():
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    await response.write(event + b"\n\n")
                    if cut_after and _has_text(event):
                        sent += 1
                        if sent >= cut_after and request.transport is not None:
                            request.transport.abort()
                            return response
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_post("/v1/{tail:.+}", handle)
    return app


def _has_text(event: bytes) -> bool:
    if not event.startswith(b"data: {"):
        return False
    choice = (json.loads(event[6:]).get("choices") or [{}])[0]
    return bool((choice.get("delta") or {}).get("content") or choice.get("text"))


@dataclass
class Streamed:
    pieces: list[str] = field(default_factory=list)
    done: bool = False
    error: Any = None
    ids: set[str] = field(default_factory=set)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


async def read(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> Streamed:
    out = Streamed()
    async with session.post(url, json=body, headers=headers) as r:
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                out.done = True
                continue
            obj = json.loads(data)
            if "error" in obj:
                out.error = obj["error"]
                continue
            out.ids.add(obj.get("id"))
            for choice in obj.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content") or choice.get("text")
                if piece:
                    out.pieces.append(piece)
    return out


def request_for(chat: bool, i: int, tokens: int) -> tuple[str, dict[str, Any]]:
    common = {"model": "demo", "temperature": 0, "max_tokens": tokens, "ignore_eos": True}
    question = f"Request {i}: please write something about topic {i * 7919 % 1000}."
    if chat:
        body = {**common, "messages": [{"role": "user", "content": question}]}
        return "chat/completions", {**body, "stream": True}
    return "completions", {**common, "prompt": question, "stream": True}


async def retokenizes_differently(
    session: aiohttp.ClientSession, worker: str, text: str, generated: int
) -> bool:
    """Whether the text before the seam is not `generated` tokens when tokenized again."""
    async with session.post(f"{worker}/tokenize", json={"model": "demo", "prompt": text}) as r:
        return len((await r.json())["tokens"]) != generated


async def run(args: argparse.Namespace, worker: str) -> int:
    from gateway.app import build_app
    from gateway.server import bound_port, start

    logging.getLogger("gateway").setLevel(logging.WARNING)  # no access line per request
    rng = random.Random(args.seed)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
    proxy_runner = web.AppRunner(cutting_proxy(worker, session))
    await proxy_runner.setup()
    proxy_port = free_port()
    await web.TCPSite(proxy_runner, "127.0.0.1", proxy_port).start()
    config = {
        "endpoints": {"demo": {"strategy": "priority", "resume": True, "backends": [
            {"url": f"http://127.0.0.1:{proxy_port}/v1"}, {"url": worker}]}},
        # The cutting proxy fails on purpose every time: it must never be ejected.
        "circuitBreaker": {"failures": 1_000_000, "cooldown": 1},
    }  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="resume-exactness-"))
    (folder / "gateway.json").write_text(json.dumps(config))
    gateway = await start(build_app(folder / "gateway.json", watch=False), "127.0.0.1", 0)
    gateway_url = f"http://127.0.0.1:{bound_port(gateway)}/v1"
    results: dict[str, list[bool]] = {"chat/completions": [], "completions": []}
    broken = 0
    retokenized = {"equal": 0, "differ": 0}
    differ_retokenized = 0
    skipped = 0
    merged = 0  # cuts in streams where some delta carried more than one token
    try:
        i = 0
        while sum(len(v) for v in results.values()) < args.cuts:
            tail, body = request_for(i % 2 == 0, i // 2, args.tokens)
            i += 1
            whole = await read(session, f"{worker}/{tail}", body, {})
            if len(whole.pieces) < 2:  # nothing to cut between
                skipped += 1
                continue
            merged += len(whole.pieces) != args.tokens
            k = rng.randrange(1, len(whole.pieces))
            resumed = await read(session, f"{gateway_url}/{tail}", body, {CUT_HEADER: str(k)})
            if not resumed.done or resumed.error or len(resumed.ids) != 1:
                broken += 1
            same = resumed.text == whole.text
            results[tail].append(same)
            prefix = "".join(whole.pieces[:k])
            changed = await retokenizes_differently(session, worker, prefix, k)
            retokenized["differ" if changed else "equal"] += 1
            if not same:
                differ_retokenized += changed
    finally:
        await gateway.cleanup()
        await proxy_runner.cleanup()
        await session.close()
    total = sum(len(v) for v in results.values())
    exact = sum(sum(v) for v in results.values())
    print(
        f"resume exactness, demo worker, greedy, {args.tokens} tokens, {total} cuts "
        f"(seed {args.seed}): {exact}/{total} resumed texts equal the uninterrupted "
        f"({100 * exact / max(total, 1):.1f} %)"
    )
    for tail, values in results.items():
        print(f"  {tail:<17} {sum(values)}/{len(values)}")
    print(
        f"  text before the seam re-tokenized to other tokens than generated: "
        f"{retokenized['differ']}/{total}; among the texts that differ: "
        f"{differ_retokenized}/{total - exact}"
    )
    print(f"  streams not whole (an error event, no [DONE], or several ids): {broken}")
    print(
        f"  cuts in streams with fewer text deltas than tokens (a character over several "
        f"tokens): {merged}; prompts skipped (under 2 deltas): {skipped}"
    )
    return 0 if broken == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuts", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=48, help="tokens per stream (48)")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--worker-url", help="a running demo worker's /v1 URL")
    args = parser.parse_args()
    proc = None
    worker = args.worker_url
    if worker is None:
        cache = os.environ.get("WORKER_CACHE_DIR") or tempfile.mkdtemp(prefix="resume-cache-")
        proc, worker = start_worker(cache)
    try:
        return asyncio.run(run(args, worker))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


if __name__ == "__main__":
    sys.exit(main())

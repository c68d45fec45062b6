"""200 concurrent streams over 3 backends while one is killed: every request completes or
ends with an explicit error, none hangs, and requests that had not started streaming all
succeed on the survivors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import aiohttp
import pytest
from aiohttp import web

from gateway.state import BACKENDS
from tests.gateway.backend import Received, chunk, sse, start_sse
from tests.gateway.test_failures import free_port

EVENTS = 20
GAP = 0.05
UNDER_WAY = 5  # streams the victim has sent three events of when it is killed

BACKEND_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from aiohttp import web

    told = 0

    async def chat(request):
        global told
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(%(events)d):
            event = {"model": "m", "choices": [{"index": 0, "delta": {"content": "k"}}]}
            await response.write(b"data: " + json.dumps(event).encode() + b"\\n\\n")
            if i == 2 and told < %(tell)d:  # this stream is well under way: say so
                told += 1
                print("streaming", flush=True)
            await asyncio.sleep(%(gap)f)
        await response.write(b"data: [DONE]\\n\\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=lambda *_: print("up", flush=True))
    """
) % {"events": EVENTS, "gap": GAP, "tell": UNDER_WAY}


async def streaming(request: web.Request, received: Received) -> web.StreamResponse:
    response = await start_sse(request)
    for _ in range(EVENTS):
        await response.write(sse(chunk("m", "k")))
        await asyncio.sleep(GAP)
    await response.write(b"data: [DONE]\n\n")
    return response


@pytest.mark.timeout(120)
async def test_200_streams_while_a_backend_is_killed(make_gateway, make_backend, tmp_path) -> None:
    survivors = [await make_backend(), await make_backend()]
    for backend in survivors:
        backend.handler = streaming
    port = free_port()
    script = tmp_path / "victim.py"
    script.write_text(BACKEND_SCRIPT)
    victim = subprocess.Popen(
        [sys.executable, str(script), str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert victim.stdout.readline().strip() == "up"
        urls = [f"http://127.0.0.1:{port}/v1", *(b.url for b in survivors)]
        gw = await make_gateway(
            {
                "endpoints": {"m": {"backends": [{"url": u} for u in urls]}},
                "timeouts": {"connect": 2, "firstByte": 10, "idle": 5},
                "circuitBreaker": {"failures": 2, "cooldown": 30},
            }
        )
        outcomes: list[str] = []
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def one(delay: float) -> None:
                await asyncio.sleep(delay)
                started_streaming = False
                try:
                    async with asyncio.timeout(30):
                        async with http.post(
                            gw.url + "/v1/chat/completions", json={"model": "m", "stream": True}
                        ) as response:
                            if response.status != 200:
                                outcomes.append(f"http_{response.status}")
                                return
                            body = b""
                            async for data in response.content.iter_any():
                                started_streaming = True
                                body += data
                except TimeoutError:
                    outcomes.append("hung")
                    return
                events = [e for e in body.split(b"\n\n") if e]
                if events and events[-1] == b"data: [DONE]":
                    assert len(events) == EVENTS + 1
                    assert all(json.loads(e[6:])["model"] == "m" for e in events[:-1])
                    outcomes.append("ok")
                elif events and b'"error"' in events[-1] and started_streaming:
                    assert json.loads(events[-1][6:])["error"]["code"] == "died"
                    outcomes.append("cut_after_start")
                else:
                    outcomes.append("malformed")

            async def kill_once_streams_are_under_way() -> None:
                for _ in range(UNDER_WAY):
                    line = await asyncio.to_thread(victim.stdout.readline)
                    assert line.strip() == "streaming"
                victim.kill()

            # Arrivals spread over 1.5 s: some streams are running on the victim when it
            # dies, others arrive after it and must be routed around it.
            await asyncio.gather(
                kill_once_streams_are_under_way(), *(one(i * 0.0075) for i in range(200))
            )

        assert len(outcomes) == 200
        assert outcomes.count("hung") == 0
        assert outcomes.count("malformed") == 0
        assert not [o for o in outcomes if o.startswith("http_")], outcomes
        # Only streams already running on the victim may be cut, and they say so.
        cut = outcomes.count("cut_after_start")
        assert 0 < cut < 100
        assert outcomes.count("ok") == 200 - cut
        # The survivors served everything that was not cut, and nothing leaked.
        assert sum(len(b.received) for b in survivors) >= 200 - cut
        assert all(s.in_flight == 0 for s in gw.app[BACKENDS].states.values())
    finally:
        victim.kill()
        victim.wait()

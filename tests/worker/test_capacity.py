"""Slots and the waiting line: a disconnect frees its slot at once; a full line is 503."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import pytest

from tests.worker.conftest import WorkerProcess

# Long enough (about 10 s of decoding on this CPU) that a slot held until the end would
# make every check below time out.
LONG = {"max_tokens": 2000, "temperature": 0, "ignore_eos": True}


async def _health(worker: WorkerProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{worker.origin}/health") as r:
        return await r.json()


async def _wait_for(worker: WorkerProcess, within: float = 3.0, **expect: int) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        health = await _health(worker)
        if all(health[k] == v for k, v in expect.items()):
            return health
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {expect}, health is {health}")
        await asyncio.sleep(0.02)


async def _tokens_generated(worker: WorkerProcess) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{worker.origin}/metrics") as r:
        text = await r.text()
    line = next(x for x in text.splitlines() if x.startswith("worker_generated_tokens_total"))
    return float(line.split()[-1])


async def test_stream_disconnect_frees_the_slot(
    small_worker: WorkerProcess, small_client: openai.AsyncOpenAI
) -> None:
    await _wait_for(small_worker, running=0, waiting=0)
    generated_before = await _tokens_generated(small_worker)
    body = {"model": "tiny", "prompt": "count:", "stream": True, **LONG}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{small_worker.base_url}/completions", json=body)
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")  # tokens are flowing
        await _wait_for(small_worker, running=1)
        resp.close()  # hang up mid-stream
        await _wait_for(small_worker, running=0)
    # Freed by the hang-up, not by the request running to its end: counted, not timed.
    assert await _tokens_generated(small_worker) - generated_before < LONG["max_tokens"]
    # The slot is really free: the next request runs at once (one slot, one place in line).
    resp2 = await small_client.completions.create(model="tiny", prompt="x", max_tokens=3)
    assert resp2.usage is not None and resp2.usage.completion_tokens <= 3
    # And nothing is generating for nobody.
    before = await _tokens_generated(small_worker)
    await asyncio.sleep(0.5)
    assert await _tokens_generated(small_worker) == before


async def test_non_stream_disconnect_frees_the_slot(small_worker: WorkerProcess) -> None:
    await _wait_for(small_worker, running=0, waiting=0)
    body = {"model": "tiny", "prompt": "count:", **LONG}
    async with aiohttp.ClientSession() as http:
        task = asyncio.create_task(http.post(f"{small_worker.base_url}/completions", json=body))
        await _wait_for(small_worker, running=1)
        task.cancel()  # the client gives up before any byte of the answer
        with pytest.raises(asyncio.CancelledError):
            await task
    await _wait_for(small_worker, running=0)


async def test_full_queue_is_503_with_retry_after(small_worker: WorkerProcess) -> None:
    await _wait_for(small_worker, running=0, waiting=0)
    body = {"model": "tiny", "prompt": "count:", "stream": True, **LONG}
    async with aiohttp.ClientSession() as http:
        first = await http.post(f"{small_worker.base_url}/completions", json=body)
        await first.content.readuntil(b"\n\n")
        second = asyncio.create_task(http.post(f"{small_worker.base_url}/completions", json=body))
        await _wait_for(small_worker, running=1, waiting=1)
        async with http.post(f"{small_worker.base_url}/completions", json=body) as third:
            assert third.status == 503
            assert third.headers["Retry-After"] == "1"
            error = (await third.json())["error"]
        assert error["code"] == "queue_full"
        assert set(error) == {"message", "type", "param", "code"}
        first.close()
        # The waiting request gets the slot as soon as the first one leaves.
        second_resp = await second
        await second_resp.content.readuntil(b"\n\n")
        second_resp.close()
    await _wait_for(small_worker, running=0, waiting=0)


async def test_queue_full_through_the_sdk(
    small_worker: WorkerProcess, small_client: openai.AsyncOpenAI
) -> None:
    await _wait_for(small_worker, running=0, waiting=0)
    holders = [
        asyncio.create_task(
            small_client.completions.create(
                model="tiny",
                prompt="count:",
                max_tokens=LONG["max_tokens"],
                extra_body={"ignore_eos": True},
            )
        )
        for _ in range(2)
    ]
    try:
        await _wait_for(small_worker, running=1, waiting=1)
        with pytest.raises(openai.APIStatusError) as err:
            await small_client.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert err.value.status_code == 503
    finally:
        for h in holders:
            h.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    await _wait_for(small_worker, running=0, waiting=0)

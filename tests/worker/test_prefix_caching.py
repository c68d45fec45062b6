"""Prefix caching (--prefix-caching): later prompts reuse the KV blocks of an earlier prompt's
prefix, the hits are counted in /metrics, and greedy outputs stay token for token the same."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.worker.conftest import API_KEY, WorkerProcess, start_worker, wait_ready

SHARED = "The system prompt says many things about caching and routing. " * 8


@pytest.fixture(scope="module")
def caching_worker(
    tmp_path_factory: pytest.TempPathFactory, demo_cache: Path
) -> Iterator[WorkerProcess]:
    logs = tmp_path_factory.mktemp("prefix-caching")
    worker = start_worker(
        logs / "worker.log",
        demo_cache,
        "--model", "demo",
        "--max-model-len", "512",
        "--kv-cache-tokens", "2048",
        "--prefix-caching",
        api_key=API_KEY,
    )  # fmt: skip
    try:
        wait_ready(worker)
        yield worker
    finally:
        worker.stop()


async def _greedy(worker: WorkerProcess, prompts: list[str]) -> list[str]:
    async with openai.AsyncOpenAI(base_url=worker.base_url, api_key=API_KEY) as client:
        sequential = [
            (await client.completions.create(model="demo", prompt=p, max_tokens=16, temperature=0))
            .choices[0]
            .text
            for p in prompts
        ]
        together = await asyncio.gather(
            *(
                client.completions.create(model="demo", prompt=p, max_tokens=16, temperature=0)
                for p in prompts
            )
        )
    return sequential + [c.choices[0].text for c in together]


async def _metric(worker: WorkerProcess, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{worker.origin}/metrics") as r:
        text = await r.text()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def test_prefix_hits_are_counted_and_greedy_output_is_unchanged(
    caching_worker: WorkerProcess, worker: WorkerProcess
) -> None:
    prompts = [f"{SHARED} Question {i}: what is a block?" for i in range(4)]
    with_caching = await _greedy(caching_worker, prompts)
    without = await _greedy(worker, prompts)
    assert with_caching == without
    hits = await _metric(caching_worker, "worker_prefix_cache_hits_tokens")
    queries = await _metric(caching_worker, "worker_prefix_cache_queries_tokens")
    assert queries > 0 and hits >= queries / 4  # most of each later prompt came from cache
    assert await _metric(worker, "worker_prefix_cache_hits_tokens") == 0

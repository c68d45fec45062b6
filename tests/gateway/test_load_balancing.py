"""Selection policies seen from the client, over HTTP.

Least-busy spreads load and breaks ties at random, weighted round robin follows the weights,
priority keeps to the primary. Each policy is unit-tested without HTTP in
test_selection_policies.py."""

from __future__ import annotations

import asyncio

from gateway.state import BACKENDS
from tests.gateway.backend import slow_stream
from tests.gateway.configs import multi


async def test_least_busy_spreads_concurrent_load(make_gateway, make_backend) -> None:
    backends = [await make_backend() for _ in range(3)]
    for b in backends:
        b.handler = slow_stream
    gw = await make_gateway(multi(*(b.url for b in backends)))
    client = gw.openai()

    async def one() -> None:
        stream = await client.chat.completions.create(model="m", messages=[], stream=True)
        [c async for c in stream]

    await asyncio.gather(*(one() for _ in range(30)))
    counts = sorted(len(b.received) for b in backends)
    assert sum(counts) == 30
    assert counts[0] >= 8, counts  # exact in-flight accounting: close to 10 each
    assert all(s.in_flight == 0 for s in gw.app[BACKENDS].states.values())


async def test_least_busy_breaks_ties_at_random(make_gateway, make_backend) -> None:
    """Sequential requests leave every backend idle: ties must not all go to the first."""
    backends = [await make_backend() for _ in range(2)]
    gw = await make_gateway(multi(*(b.url for b in backends)))
    for _ in range(40):
        await gw.openai().chat.completions.create(model="m", messages=[])
    assert min(len(b.received) for b in backends) >= 8


async def test_weighted_round_robin_follows_weights(make_gateway, make_backend) -> None:
    heavy, light = await make_backend(), await make_backend()
    cfg = {
        "endpoints": {
            "m": {
                "backends": [{"url": heavy.url, "weight": 3}, {"url": light.url, "weight": 1}],
                "strategy": "weighted-round-robin",
            }
        }
    }
    gw = await make_gateway(cfg)
    for _ in range(8):
        await gw.openai().chat.completions.create(model="m", messages=[])
    assert (len(heavy.received), len(light.received)) == (6, 2)


async def test_priority_uses_the_primary_while_it_is_healthy(make_gateway, make_backend) -> None:
    primary, fallback = await make_backend(), await make_backend()
    gw = await make_gateway(multi(primary.url, fallback.url, strategy="priority"))
    for _ in range(5):
        await gw.openai().chat.completions.create(model="m", messages=[])
    assert (len(primary.received), len(fallback.received)) == (5, 0)

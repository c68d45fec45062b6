"""Cache-aware routing seen from the client, against fake replicas on loopback: sessions
stick, prefixes find their replica, the load guard and bursts spread, resting replicas
attract nothing, reloads keep what they can, and each engine's metrics are read."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from aiohttp import web
from yarl import URL

from gateway.backends import Backends
from gateway.load_signals import LoadSignals, Signals, parse_signals
from gateway.routing import Target
from gateway.state import BACKENDS, POLICIES, STORE
from tests.gateway.backend import FakeBackend, Received, chat_completion
from tests.gateway.waiting import state_of, until

SYSTEM = "You are a helpful assistant who answers in full sentences. " * 30


def config(*backends: FakeBackend, **extra: Any) -> dict[str, Any]:
    return {
        "endpoints": {
            "m": {
                "backends": [{"url": b.url} for b in backends],
                "strategy": "cache-aware",
                **extra,
            }
        }
    }


def chat(*user_turns: str, system: str = SYSTEM) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}]
    for i, turn in enumerate(user_turns):
        if i:
            messages.append({"role": "assistant", "content": f"answer {i} " * 20})
        messages.append({"role": "user", "content": turn})
    return messages


def chats(backends: list[FakeBackend]) -> list[int]:
    return [sum(1 for r in b.received if r.path.endswith("/chat/completions")) for b in backends]


class Gate:
    """A backend handler that holds every chat request until `open` is set."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.held = 0

    async def __call__(self, request: web.Request, received: Received) -> web.StreamResponse:
        if not request.path.endswith("/chat/completions"):
            return web.Response(status=404)
        self.held += 1
        await self.open.wait()
        return web.json_response(chat_completion("m"))


async def test_a_session_sticks_to_its_replica(make_gateway, make_backend) -> None:
    backends = [await make_backend() for _ in range(4)]
    gw = await make_gateway(config(*backends))
    client = gw.openai()
    for i in range(12):  # unrelated contents: only the header ties them together
        await client.chat.completions.create(
            model="m",
            messages=chat(f"question {i} " * 30, system=f"prompt {i} " * 50),
            extra_headers={"X-OpenWebUI-Chat-Id": "chat-42"},
        )
    assert sorted(chats(backends)) == [0, 0, 0, 12]


async def test_a_conversation_finds_the_replica_holding_its_prefix(
    make_gateway, make_backend, http
) -> None:
    backends = [await make_backend() for _ in range(4)]
    gw = await make_gateway(config(*backends))
    client = gw.openai()
    turns = [f"turn {i}: tell me more about caches " * 10 for i in range(6)]
    for n in range(1, len(turns) + 1):  # no session header: the history alone routes it
        await client.chat.completions.create(model="m", messages=chat(*turns[:n]))
    assert sorted(chats(backends)) == [0, 0, 0, 6]
    async with http.get(f"{gw.url}/metrics") as r:
        text = await r.text()
    assert 'gateway_routing_decisions_total{model="m",reason="prefix"} 5.0' in text
    assert 'gateway_routing_decisions_total{model="m",reason="cold"} 1.0' in text
    assert "gateway_routing_matched_prefix_tokens_bucket" in text


async def test_the_key_is_the_whole_conversation_not_its_first_message(
    make_gateway, make_backend
) -> None:
    """Conversations sharing one system prompt start together (so they spread), then each
    keeps to its own replica: a key built from messages[0] alone would send every later turn
    to one of them."""
    backends = [await make_backend() for _ in range(4)]
    gate = Gate()
    for b in backends:
        b.handler = gate
    gw = await make_gateway(config(*backends))
    client = gw.openai()
    turns = {c: [f"conversation {c} turn {i} " * 12 for i in range(4)] for c in range(8)}
    first = [
        asyncio.create_task(client.chat.completions.create(model="m", messages=chat(t[0])))
        for t in turns.values()
    ]
    await until(lambda: gate.held == 8, what="8 first turns at the replicas")
    gate.open.set()
    await asyncio.gather(*first)
    home = {
        c: next(
            i for i, b in enumerate(backends) if any(t[0] in r.body.decode() for r in b.received)
        )
        for c, t in turns.items()
    }
    assert len(set(home.values())) >= 2  # they did spread
    for c, t in turns.items():
        for n in range(2, 5):
            before = chats(backends)
            await client.chat.completions.create(model="m", messages=chat(*t[:n]))
            after = chats(backends)
            assert after[home[c]] == before[home[c]] + 1, (c, n)


async def test_a_burst_of_first_turns_spreads(make_gateway, make_backend) -> None:
    backends = [await make_backend() for _ in range(4)]
    gate = Gate()
    for b in backends:
        b.handler = gate
    gw = await make_gateway(config(*backends))
    client = gw.openai()
    tasks = [
        asyncio.create_task(
            client.chat.completions.create(model="m", messages=chat(f"user {i} asks " * 10))
        )
        for i in range(64)
    ]
    await until(lambda: gate.held == 64, what="64 requests at the replicas")
    counts = chats(backends)
    gate.open.set()
    await asyncio.gather(*tasks)
    assert max(counts) <= 1.5 * 64 / 4, counts
    states = gw.app[BACKENDS].states.values()
    assert all(s.in_flight == 0 and s.prefill_tokens == 0 for s in states)


async def test_the_guard_moves_a_session_off_a_hot_replica(make_gateway, make_backend) -> None:
    backends = [await make_backend() for _ in range(3)]
    gate = Gate()
    for b in backends:
        b.handler = gate
    gw = await make_gateway(config(*backends))
    client = gw.openai()
    headers = {"X-Session-Id": "busy-user"}
    tasks = [
        asyncio.create_task(
            client.chat.completions.create(
                model="m", messages=chat(f"q {i} " * 20), extra_headers=headers
            )
        )
        for i in range(12)
    ]
    await until(lambda: gate.held == 12, what="12 requests at the replicas")
    counts = chats(backends)
    gate.open.set()
    await asyncio.gather(*tasks)
    # The session's replica takes what the bound allows (mean + margin), the rest move.
    assert max(counts) < 12 and sum(1 for c in counts if c) >= 2, counts


class HoldMarked:
    """A backend handler that answers at once, except the requests carrying `marker`: those
    it holds (no first byte: still in prefill) until `open` is set."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.open = asyncio.Event()
        self.held = 0

    async def __call__(self, request: web.Request, received: Received) -> web.StreamResponse:
        if not request.path.endswith("/chat/completions"):
            return web.Response(status=404)
        if self.marker in (await request.text()):
            self.held += 1
            await self.open.wait()
        return web.json_response(chat_completion("m"))


@pytest.mark.parametrize("prefill_wait", [True, False])
async def test_a_turn_avoids_a_replica_busy_with_a_long_prefill(
    make_gateway, make_backend, http, prefill_wait
) -> None:
    """The replica holding a conversation is busy prefilling a long new prompt (sent, not yet
    answered): the conversation's next turn re-prefills its short history elsewhere rather
    than wait behind ~10k tokens. With `prefillWait` off it waits there."""
    backends = [await make_backend() for _ in range(3)]
    hold = HoldMarked("HOLD-ME")
    for b in backends:
        b.handler = hold
    extra = {} if prefill_wait else {"cacheAware": {"prefillWait": False}}
    gw = await make_gateway(config(*backends, **extra))
    client = gw.openai()
    turns = [f"turn {i}: what does a prefix cache keep? " * 10 for i in range(3)]
    await client.chat.completions.create(model="m", messages=chat(turns[0]))
    home = chats(backends).index(1)
    # The same conversation's prefix with a long new question: it goes home, and waits there.
    long = asyncio.create_task(
        client.chat.completions.create(
            model="m", messages=chat(turns[0], "HOLD-ME " + "a long document " * 2_500)
        )
    )
    await until(lambda: hold.held == 1, what="the long prompt at its replica")
    assert chats(backends)[home] == 2
    async with http.get(f"{gw.url}/debug") as r:
        routing = (await r.json())["routing"]["m"]
    label = state_of(gw.app, backends[home].port).label
    assert routing[label]["prefillTokens"] > 9_000  # its ~10k uncached tokens, not yet answered
    before = chats(backends)
    await client.chat.completions.create(model="m", messages=chat(*turns[:2]))
    moved = [a - b for a, b in zip(chats(backends), before, strict=True)]
    hold.open.set()
    await long
    if prefill_wait:
        assert moved[home] == 0 and sum(moved) == 1, moved
        async with http.get(f"{gw.url}/metrics") as r:
            text = await r.text()
        assert 'gateway_routing_decisions_total{model="m",reason="balance"} 1.0' in text
    else:
        assert moved[home] == 1, moved
    states = gw.app[BACKENDS].states.values()
    assert all(s.prefill_tokens == 0 and s.in_flight == 0 for s in states)


@pytest.mark.parametrize("queued_words", [800, 3_000])
async def test_a_long_shared_document_stays_where_it_is_held_unless_the_queue_is_longer(
    make_gateway, make_backend, http, queued_words: int
) -> None:
    """A question about a ~2.6k-token document held at home, while ~4k tokens of another
    prompt are prefilling there: moving would copy the document into a second cache (and
    evict as much), so it stays; behind ~15k tokens it moves (the copy counts twice)."""
    backends = [await make_backend() for _ in range(3)]
    hold = HoldMarked("HOLD-ME")
    for b in backends:
        b.handler = hold
    gw = await make_gateway(config(*backends))
    client = gw.openai()
    document = "shared document text " * 500
    await client.chat.completions.create(model="m", messages=chat("q1", system=document))
    home = chats(backends).index(1)
    long = asyncio.create_task(
        client.chat.completions.create(
            model="m",
            messages=chat("HOLD-ME " + "a long new question " * queued_words, system=document),
        )
    )
    await until(lambda: hold.held == 1, what="the long prompt at the document's replica")
    assert chats(backends)[home] == 2
    before = chats(backends)
    await client.chat.completions.create(model="m", messages=chat("q2", system=document))
    moved = [a - b for a, b in zip(chats(backends), before, strict=True)]
    hold.open.set()
    await long
    if queued_words == 800:
        assert moved[home] == 1, moved
    else:
        assert moved[home] == 0 and sum(moved) == 1, moved


def test_the_prefill_estimate_is_released_on_every_path() -> None:
    """Answered (first event) or ended any other way (failure, client gone), once."""
    backends = Backends()
    t = Target(URL("http://a:8000/v1"), None, None, {}, 1, None)
    answered = backends.begin(t, time.monotonic())
    backends.prefilling(answered, 1_000)
    failed = backends.begin(t, time.monotonic())
    backends.prefilling(failed, 500)
    assert backends.state(t).prefill_tokens == 1_500
    backends.answered(answered)
    assert backends.state(t).prefill_tokens == 500
    backends.end(answered)  # answered already: not released twice
    backends.end(failed)  # never answered: released with its slot
    assert backends.state(t).prefill_tokens == 0 and backends.state(t).in_flight == 0


async def test_a_resting_replica_is_never_chosen_through_the_index(
    make_gateway, make_backend, http
) -> None:
    backends = [await make_backend() for _ in range(3)]
    gw = await make_gateway(config(*backends))
    client = gw.openai()
    turns = [f"a long conversation about replicas, turn {i} " * 10 for i in range(4)]
    await client.chat.completions.create(model="m", messages=chat(*turns[:1]))
    holder = next(b for b, n in zip(backends, chats(backends), strict=True) if n)
    state = state_of(gw.app, holder.port)
    state.ejected_until = time.monotonic() + 60  # as the circuit breaker does
    for n in range(2, 5):
        await client.chat.completions.create(model="m", messages=chat(*turns[:n]))
    assert chats(backends)[backends.index(holder)] == 1
    state.ejected_until = 0.0  # back: its cache was lost with it
    async with http.get(f"{gw.url}/debug") as r:
        debug = await r.json()
    assert debug["routing"]["m"][state.label]["indexBlocks"] == 0
    before = chats(backends)[backends.index(holder)]
    await client.chat.completions.create(model="m", messages=chat(*turns))
    assert chats(backends)[backends.index(holder)] == before  # the new holder keeps it


async def test_reload_keeps_the_index_of_unchanged_replicas(
    make_gateway, make_backend, http
) -> None:
    a, b, c = [await make_backend() for _ in range(3)]
    gw = await make_gateway(config(a, b, c))
    client = gw.openai()
    for i in range(12):  # nothing shared: they go round the three
        messages = chat(f"topic {i} " * 40, system=f"own prompt {i} " * 30)
        await client.chat.completions.create(model="m", messages=messages)

    async def parts() -> dict[str, int]:
        async with http.get(f"{gw.url}/debug") as r:
            routing = (await r.json())["routing"]["m"]
        return {k: v["indexBlocks"] for k, v in routing.items() if k != "sessions"}

    before = await parts()
    d = await make_backend()
    gw.config_path.write_text(json.dumps(config(a, b, d)))
    async with http.post(f"{gw.url}/reload") as r:
        assert r.status == 200
    await client.chat.completions.create(model="m", messages=chat("after the reload " * 40))
    after = await parts()
    gone = f"127.0.0.1:{c.port}"
    assert gone in before and gone not in after
    route = gw.app[STORE].current.routes["m"]
    policy = gw.app[POLICIES].for_route(route)
    assert {t.label for t in route.targets} == set(after)
    assert len(policy.index.parts) <= 3  # the removed replica's part is gone
    for backend in (a, b):  # kept: never smaller than before (the request above may add)
        label = f"127.0.0.1:{backend.port}"
        assert after[label] >= before[label]
    assert sum(before[f"127.0.0.1:{x.port}"] for x in (a, b)) > 0


# -- the backends' own signals -----------------------------------------------------------

VLLM = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
vllm:num_requests_waiting{engine="0",model_name="llama"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.42
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="2048"} 1.0
vllm:e2e_request_latency_seconds_bucket{le="0.3",model_name="llama"} 7.0
"""
SGLANG_OLD = """sglang:num_running_reqs{model_name="q"} 7.0
sglang:num_queue_reqs{model_name="q"} 1.0
sglang:token_usage{model_name="q"} 0.9
"""
SGLANG_NEW = SGLANG_OLD.replace("sglang:", "sglang_")
LLAMACPP = """# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
llamacpp:requests_deferred 5
"""
WORKER = """worker_running_requests 1.0
worker_waiting_requests 0.0
worker_kv_cache_usage_perc 0.25
worker_cache_config_info{block_size="64",num_gpu_blocks="128"} 1.0
"""


def test_each_engine_dialect_is_read() -> None:
    assert parse_signals(VLLM, 1.0) == Signals(5.0, 4.0, 0.42, 32768, 1.0)
    assert parse_signals(SGLANG_OLD, 1.0) == Signals(7.0, 1.0, 0.9, None, 1.0)
    assert parse_signals(SGLANG_NEW, 1.0) == Signals(7.0, 1.0, 0.9, None, 1.0)
    assert parse_signals(LLAMACPP, 1.0) == Signals(2.0, 5.0, None, None, 1.0)
    assert parse_signals(WORKER, 1.0) == Signals(1.0, 0.0, 0.25, 8192, 1.0)
    assert parse_signals("<html>not found</html>", 1.0) == Signals(at=1.0)


def test_a_stale_reading_is_ignored() -> None:
    signals = LoadSignals()
    signals.readings["b"] = parse_signals(VLLM, at=100.0)
    assert signals.fresh("b", 101.0, stale_after=2.0) is not None
    assert signals.fresh("b", 103.0, stale_after=2.0) is None


def serving_metrics(text: str | None, gate: Gate | None = None) -> Any:
    async def handler(request: web.Request, received: Received) -> web.StreamResponse:
        if request.path == "/metrics":
            if text is None:
                return web.Response(status=404)
            return web.Response(text=text, content_type="text/plain")
        if gate is not None:
            return await gate(request, received)
        return web.json_response(chat_completion("m"))

    return handler


async def every_replica_scraped(http: Any, gw: Any) -> None:
    """Wait until /debug shows scraped signals for every backend of model `m` (10 s at most)."""

    async def scraped() -> bool:
        async with http.get(f"{gw.url}/debug") as r:
            routing = (await r.json())["routing"]["m"]
        return all(v["signals"] for k, v in routing.items() if k != "sessions")

    deadline = time.monotonic() + 10
    while not await scraped():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_a_saturated_replica_is_filtered_out_first(make_gateway, make_backend, http) -> None:
    drowning, calm = await make_backend(), await make_backend()
    drowning.handler = serving_metrics(VLLM.replace("} 4.0", "} 40.0"))  # 40 waiting
    calm.handler = serving_metrics(VLLM.replace("} 4.0", "} 0.0"))
    gw = await make_gateway(config(drowning, calm, cacheAware={"metricsInterval": 0.05}))

    await every_replica_scraped(http, gw)
    assert any(r.path == "/metrics" for r in drowning.received)  # at the origin, not /v1
    client = gw.openai()
    for i in range(10):
        await client.chat.completions.create(model="m", messages=chat(f"x {i} " * 30))
    assert chats([drowning, calm]) == [0, 10]


async def test_a_replica_without_metrics_still_works(make_gateway, make_backend, http) -> None:
    bare, other = await make_backend(), await make_backend()
    bare.handler = serving_metrics(None)
    other.handler = serving_metrics(None)
    gw = await make_gateway(config(bare, other, cacheAware={"metricsInterval": 0.05}))
    await until(lambda: any(r.path == "/metrics" for r in bare.received), what="a scrape")
    client = gw.openai()
    for i in range(8):
        messages = chat(f"y {i} " * 30, system=f"nothing shared {i} " * 20)
        await client.chat.completions.create(model="m", messages=messages)
    assert sum(chats([bare, other])) == 8
    async with http.get(f"{gw.url}/debug") as r:
        routing = (await r.json())["routing"]["m"]
    assert routing[state_of(gw.app, bare.port).label]["scrapeError"] == "http_404"


async def test_when_every_replica_is_saturated_sessions_still_stick(
    make_gateway, make_backend, http
) -> None:
    """The saturation filter cannot tell saturated replicas apart: the index still decides
    among them, rather than load alone moving every conversation off its cache."""
    backends = [await make_backend() for _ in range(3)]
    for b in backends:
        b.handler = serving_metrics(VLLM.replace("} 4.0", "} 40.0"))
    gw = await make_gateway(config(*backends, cacheAware={"metricsInterval": 0.05}))

    await every_replica_scraped(http, gw)
    client = gw.openai()
    for i in range(9):
        await client.chat.completions.create(
            model="m",
            messages=chat(f"z {i} " * 30, system=f"unrelated {i} " * 30),
            extra_headers={"X-Session-Id": "kept"},
        )
    assert sorted(chats(backends)) == [0, 0, 9]

"""Routing simulation: fake vLLM replicas behind the real gateway, five policies side by side.

Each replica models what matters to routing: an LRU prefix cache of 16-token blocks with a
set capacity, prefill time proportional to the uncached tokens, decode time per step that grows
with the batch, a maximum batch with a queue behind it, and vLLM's metric names on /metrics.
Time is compressed (a "token" is 4 characters, a prefill token costs microseconds) so that a
whole run takes a few minutes on two cores. It prints figures; it asserts nothing.

    .venv/bin/python bench/routing_sim.py            # every workload, every policy
    .venv/bin/python bench/routing_sim.py --quick    # fewer sessions, for a smoke run
    .venv/bin/python bench/routing_sim.py --workloads chats --cache-tokens 24576  # cache-pressured
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HOST, free_port, percentile, run_async, serve_until_signalled
from gateway_bench import Children, gateway_environment, wait_listening

BLOCK_CHARS = 64  # 16 tokens of 4 characters
CHARS_PER_TOKEN = 4

# -- the fake replica -----------------------------------------------------------------------


@dataclass
class ReplicaModel:
    cache_tokens: int = 24_576  # set per workload on /reset: see CACHE_TOKENS
    max_batch: int = 8
    prefill_s_per_token: float = 100e-6  # 10k tokens/s: a 2k-token prompt costs 200 ms
    decode_base_s: float = 0.008
    decode_s_per_seq: float = 0.0015
    output_tokens: int = 24


@dataclass
class Job:
    blocks: list[int]
    prompt_tokens: int
    done: asyncio.Event = field(default_factory=asyncio.Event)
    first: asyncio.Event = field(default_factory=asyncio.Event)
    left: int = 0
    arrived: float = 0.0  # at the replica
    uncached: int = 0
    full: bool = False  # the batch was full when it arrived: it queued for a slot


class Replica:
    """One engine: its cache, its scheduler loop and its counters."""

    def __init__(self, model: ReplicaModel) -> None:
        self.model = model
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.waiting: list[Job] = []
        self.running: list[Job] = []
        self.wake = asyncio.Event()
        self.reset()

    def reset(self) -> None:
        self.cache.clear()
        # jobs: per request [queued s (arrival to the start of its step), its step's s,
        # uncached tokens, whether it found the batch full], for the tail table.
        self.stats = {
            "requests": 0,
            "prompt_tokens": 0,
            "hit_tokens": 0,
            "busy_s": 0.0,
            "jobs": [],
            # /metrics answers, and those reading KV usage over the gateway's default
            # maxKvUsage (0.95): how often the saturation filter could leave this one out.
            "scrapes": 0,
            "kv_over": 0,
        }

    @staticmethod
    def blocks(body: dict[str, Any]) -> tuple[list[int], int]:
        """The engine's view: its own chat template over every message, in 16-token blocks."""
        text = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in body["messages"])
        hashes, h = [], 0
        for i in range(0, len(text) - BLOCK_CHARS + 1, BLOCK_CHARS):
            h = hash((h, text[i : i + BLOCK_CHARS]))
            hashes.append(h)
        return hashes, len(text) // CHARS_PER_TOKEN

    def cached(self, blocks: list[int]) -> int:
        n = 0
        for b in blocks:
            if b not in self.cache:
                break
            n += 1
        return n

    def admit(self, job: Job) -> float:
        """Prefill: the cached blocks are skipped, the rest are computed and cached."""
        hit = self.cached(job.blocks)
        for b in job.blocks:
            if b in self.cache:
                self.cache.move_to_end(b)
            else:
                self.cache[b] = None
        capacity = self.model.cache_tokens // 16
        while len(self.cache) > capacity:
            self.cache.popitem(last=False)
        hit_tokens = min(job.prompt_tokens, hit * 16)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += job.prompt_tokens
        self.stats["hit_tokens"] += hit_tokens
        job.uncached = job.prompt_tokens - hit_tokens
        return (job.prompt_tokens - hit_tokens) * self.model.prefill_s_per_token

    async def loop(self) -> None:
        m = self.model
        while True:
            if not self.running and not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            step = 0.0
            began = time.monotonic()
            admitted = []
            while self.waiting and len(self.running) < m.max_batch:
                if self.running and not self.fits(self.waiting[0]):
                    break  # as vLLM's scheduler: the head of the queue waits for KV blocks
                job = self.waiting.pop(0)
                step += self.admit(job)
                job.left = m.output_tokens
                self.running.append(job)
                admitted.append(job)
            step += m.decode_base_s + m.decode_s_per_seq * len(self.running)
            await asyncio.sleep(step)
            self.stats["busy_s"] += step
            for job in admitted:
                job.first.set()
                queued, own = began - job.arrived, time.monotonic() - began
                self.stats["jobs"].append([queued, own, job.uncached, job.full])
            for job in self.running:
                job.left -= 1
            for job in [j for j in self.running if j.left <= 0]:
                self.running.remove(job)
                job.done.set()

    def held_blocks(self) -> int:
        """KV blocks the running requests hold: their prompts' (shared ones once) and their
        output's so far."""
        held = {b for job in self.running for b in job.blocks}
        decoded = sum(-(-(self.model.output_tokens - job.left) // 16) for job in self.running)
        return len(held) + decoded

    def fits(self, job: Job) -> bool:
        """Whether `job`'s prompt and output fit in the KV blocks the running requests leave:
        an engine runs no more than its KV cache holds (the fake used to, and read over 100 %)."""
        held = {b for j in self.running for b in j.blocks}
        new = sum(b not in held for b in job.blocks) + -(-self.model.output_tokens // 16)
        return self.held_blocks() + new <= self.model.cache_tokens // 16

    def kv_usage(self) -> float:
        """As vLLM counts it: the blocks the running requests hold. Cached blocks no request
        holds are free to vLLM (evictable), so a full prefix cache is not a full KV cache;
        counting them would read every warm replica as saturated (> maxKvUsage)."""
        return self.held_blocks() * 16 / self.model.cache_tokens


def replica_app(model: ReplicaModel) -> web.Application:
    app = web.Application()
    replica = Replica(model)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        blocks, tokens = Replica.blocks(body)
        job = Job(blocks, tokens)
        job.arrived = time.monotonic()
        job.full = len(replica.running) >= model.max_batch
        replica.waiting.append(job)
        replica.wake.set()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await job.first.wait()
        chunk = {
            "id": "c",
            "object": "chat.completion.chunk",
            "model": body["model"],
            "choices": [{"index": 0, "delta": {"content": "ok "}, "finish_reason": None}],
        }
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await job.done.wait()
        reply = "The answer is " + "x" * (model.output_tokens * CHARS_PER_TOKEN - 14)
        chunk["choices"] = [{"index": 0, "delta": {"content": reply}, "finish_reason": "stop"}]
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
        return response

    async def metrics(_: web.Request) -> web.Response:
        kv = replica.kv_usage()
        replica.stats["scrapes"] += 1
        replica.stats["kv_over"] += kv > 0.95
        lines = [
            f'vllm:num_requests_running{{engine="0"}} {len(replica.running)}',
            f'vllm:num_requests_waiting{{engine="0"}} {len(replica.waiting)}',
            f'vllm:kv_cache_usage_perc{{engine="0"}} {kv:.4f}',
            f'vllm:cache_config_info{{block_size="16",num_gpu_blocks="{model.cache_tokens // 16}"}}'
            " 1.0",
            f"vllm:prefix_cache_queries_total {replica.stats['prompt_tokens']}",
            f"vllm:prefix_cache_hits_total {replica.stats['hit_tokens']}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def probe(request: web.Request) -> web.Response:
        """For the oracle only: how much of this request the cache holds, and the load."""
        blocks, tokens = Replica.blocks(await request.json())
        cached = min(tokens, replica.cached(blocks) * 16)
        load = len(replica.running) + len(replica.waiting)
        return web.json_response({"cached": cached, "load": load})

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(replica.stats)

    async def reset(request: web.Request) -> web.Response:
        """Empty the cache and the counters; a body's `cache_tokens` resizes the cache."""
        body = await request.json() if request.can_read_body else {}
        if "cache_tokens" in body:
            model.cache_tokens = int(body["cache_tokens"])
        replica.reset()
        return web.json_response({"cache_tokens": model.cache_tokens})

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "sim", "object": "model"}]})

    async def start_loop(app: web.Application) -> Any:
        task = asyncio.create_task(replica.loop())
        yield
        task.cancel()

    app.cleanup_ctx.append(start_loop)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/probe", probe)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    return app


# -- workloads ------------------------------------------------------------------------------


def words(rng: random.Random, chars: int) -> str:
    vocab = ["alpha", "beta", "gamma", "delta", "kv", "cache", "route", "token", "model", "the"]
    out: list[str] = []
    n = 0
    while n < chars:
        w = rng.choice(vocab) + str(rng.randrange(1000))
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:chars]


@dataclass
class Conversation:
    """One client's sequence of requests; each turn resends the whole history."""

    start: float
    turns: list[str]
    system: str
    session: str | None
    think: float
    history: list[dict[str, str]] = field(default_factory=list)


def workload(name: str, scale: float, seed: int) -> list[Conversation]:
    rng = random.Random(seed)
    out = []
    if name == "chats":
        systems = [words(rng, 2_000) for _ in range(3)]  # ~500 tokens each
        sessions = int(48 * scale)
        for i in range(sessions):
            # Histories grow to 2-6k tokens: what routing keeps or loses is mostly history.
            turns = [words(rng, rng.randrange(1_500, 3_000)) for _ in range(rng.randrange(4, 9))]
            session = f"chat-{seed}-{i}" if i % 2 == 0 else None
            out.append(
                Conversation(
                    rng.uniform(0, 10 * scale),
                    turns,
                    rng.choice(systems),
                    session,
                    rng.uniform(1.0, 3.0),
                )
            )
    elif name == "documents":
        docs = [words(rng, 28_000) for _ in range(6)]  # ~7k tokens each: 42k > one replica
        for _ in range(int(160 * scale)):
            out.append(
                Conversation(
                    rng.uniform(0, 10 * scale),
                    [rng.choice(docs) + "\n\nQuestion: " + words(rng, 200)],
                    "Answer from the document.",
                    None,
                    0.0,
                )
            )
    else:  # no sharing at all
        for _ in range(int(200 * scale)):
            out.append(
                Conversation(
                    rng.uniform(0, 10 * scale),
                    [words(rng, rng.randrange(2_000, 6_000))],
                    words(rng, 400),
                    None,
                    0.0,
                )
            )
    return out


# Each replica's prefix-cache size per workload (--cache-tokens overrides it), chosen for the
# regime cache-aware routing is for: the fleet can hold the live working set, one replica
# cannot, so where a request goes decides whether its prefix is cached. A real vLLM replica
# (an 8B model on an 80 GB GPU) holds ~300-400k tokens and serves proportionally more
# sessions than this simulation; the ratios are what is modelled, not the absolute size.
CACHE_TOKENS = {
    # 48 histories of 2.7-5.7k tokens: ~172k distinct tokens over the whole run (the blocks of
    # every request, summed from workload()). 4 x 49,152 = 196,608 holds them all; one replica
    # holds under a third. At 24,576 (4 x 24k = 98k) the fleet cannot, and over a tenth of
    # the requests are capacity misses whatever the routing (the cache-pressured variant).
    "chats": 49_152,
    # 6 documents of ~7k tokens: 42k, more than one replica holds; the fleet's 98k holds all.
    "documents": 24_576,
    # Nothing shared: the size changes nothing but the system prompts' reuse (none).
    "unshared": 24_576,
}
BURST_CACHE_TOKENS = 24_576

# -- the client side ------------------------------------------------------------------------

# A request with more uncached tokens than this spends > 250 ms in prefill alone.
LONG_MISS = 2_500
POLICIES = ("random", "round-robin", "least-busy", "cache-aware", "oracle")
GATEWAY_MODEL = {"round-robin": "sim-rr", "least-busy": "sim-lb", "cache-aware": "sim-ca"}


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    output_tokens: int = 0
    errors: int = 0
    seconds: float = 0.0


async def choose_model(
    policy: str, http: aiohttp.ClientSession, replicas: list[str], body: dict[str, Any]
) -> str:
    if policy in GATEWAY_MODEL:
        return GATEWAY_MODEL[policy]
    if policy == "random":
        return f"sim-{random.randrange(len(replicas))}"
    # The oracle knows every cache and every queue: the best hit under the same load bound.
    answers = []
    for url in replicas:
        async with http.post(f"{url}/probe", json=body) as r:
            answers.append(await r.json())
    loads = [a["load"] for a in answers]
    mean = sum(loads) / len(loads)
    bound = max(1.25 * mean, mean + 2)
    ranked = sorted(
        range(len(replicas)),
        key=lambda i: (loads[i] > bound, -answers[i]["cached"], loads[i], random.random()),
    )
    return f"sim-{ranked[0]}"


async def one_request(
    http: aiohttp.ClientSession,
    gateway: str,
    policy: str,
    replicas: list[str],
    conv: Conversation,
    result: Result,
) -> None:
    body: dict[str, Any] = {"model": "", "stream": True, "messages": conv.history}
    body["model"] = await choose_model(policy, http, replicas, body)
    headers = {"X-OpenWebUI-Chat-Id": conv.session} if conv.session else {}
    sent = time.monotonic()
    first = None
    reply = ""
    try:
        async with http.post(f"{gateway}/v1/chat/completions", json=body, headers=headers) as r:
            if r.status != 200:
                result.errors += 1
                await r.read()
                return
            async for line in r.content:
                if line.startswith(b"data: {"):
                    if first is None:
                        first = time.monotonic()
                    chunk = json.loads(line[6:])
                    reply += chunk["choices"][0]["delta"].get("content", "")
    except aiohttp.ClientError:
        result.errors += 1
        return
    if first is not None:
        result.ttft.append(first - sent)
    result.output_tokens += len(reply) // CHARS_PER_TOKEN
    conv.history.append({"role": "assistant", "content": reply})


async def run_conversation(
    http: aiohttp.ClientSession,
    gateway: str,
    policy: str,
    replicas: list[str],
    conv: Conversation,
    t0: float,
    result: Result,
) -> None:
    await asyncio.sleep(max(0.0, t0 + conv.start - time.monotonic()))
    conv.history = [{"role": "system", "content": conv.system}]
    for i, turn in enumerate(conv.turns):
        if i:
            await asyncio.sleep(conv.think)
        conv.history.append({"role": "user", "content": turn})
        await one_request(http, gateway, policy, replicas, conv, result)


async def replica_stats(http: aiohttp.ClientSession, replicas: list[str]) -> list[dict]:
    out = []
    for url in replicas:
        async with http.get(f"{url}/stats") as r:
            out.append(await r.json())
    return out


async def run_one(
    http: aiohttp.ClientSession,
    gateway: str,
    replicas: list[str],
    policy: str,
    convs: list[Conversation],
) -> dict[str, Any]:
    for url in replicas:
        async with http.post(f"{url}/reset") as r:
            await r.read()
    result = Result()
    # Only cache-aware's route makes routing decisions worth counting.
    counted = policy == "cache-aware"
    decided = await routing_decisions(http, gateway) if counted else {}
    t0 = time.monotonic()
    await asyncio.gather(
        *(run_conversation(http, gateway, policy, replicas, c, t0, result) for c in convs)
    )
    result.seconds = time.monotonic() - t0
    stats = await replica_stats(http, replicas)
    if counted:
        after = await routing_decisions(http, gateway)
        decided = {reason: after[reason] - decided.get(reason, 0) for reason in after}
    prompt = sum(s["prompt_tokens"] for s in stats)
    hits = sum(s["hit_tokens"] for s in stats)
    busy = [s["busy_s"] for s in stats]
    # Where the tail comes from: the requests around the p90 (replica-side TTFT).
    jobs = sorted((j for s in stats for j in s["jobs"]), key=lambda j: j[0] + j[1])
    near_p90 = jobs[int(len(jobs) * 0.85) : int(len(jobs) * 0.95)] or jobs
    return {
        "policy": policy,
        "hit_tokens": hits,
        "hit_rate": hits / prompt if prompt else 0.0,
        "max_mean_load": max(busy) / statistics.mean(busy) if sum(busy) else 0.0,
        "requests": [s["requests"] for s in stats],
        "ttft_p50": percentile(result.ttft, 50),
        "ttft_p90": percentile(result.ttft, 90),
        "throughput": result.output_tokens / result.seconds,
        "errors": result.errors,
        "tail_queued": statistics.median(j[0] for j in near_p90) if jobs else 0.0,
        "tail_step": statistics.median(j[1] for j in near_p90) if jobs else 0.0,
        "tail_uncached": statistics.median(j[2] for j in near_p90) if jobs else 0,
        "long_misses": sum(j[2] > LONG_MISS for j in jobs) / max(1, len(jobs)),
        "found_full": sum(j[3] for j in jobs) / max(1, len(jobs)),
        "utilisation": statistics.mean(busy) / result.seconds,
        "kv_over": sum(s["kv_over"] for s in stats) / max(1, sum(s["scrapes"] for s in stats)),
        "decisions": {k: v for k, v in decided.items() if v},
    }


async def routing_decisions(http: aiohttp.ClientSession, gateway: str) -> dict[str, int]:
    """The cache-aware route's gateway_routing_decisions_total by reason, so far."""
    async with http.get(f"{gateway}/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line.startswith('gateway_routing_decisions_total{model="sim-ca"'):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = int(float(line.rsplit(" ", 1)[1]))
    return out


async def set_cache_tokens(
    http: aiohttp.ClientSession, gateway: str, replicas: list[str], tokens: int
) -> None:
    """Resize every replica's cache, then wait until the gateway's cache-aware route has read
    the new size from vllm:cache_config_info (its index parts are bounded by it)."""
    for url in replicas:
        async with http.post(f"{url}/reset", json={"cache_tokens": tokens}) as r:
            await r.read()
    deadline = time.monotonic() + 15
    while True:
        async with http.get(f"{gateway}/debug") as r:
            seen = (await r.json())["routing"].get("sim-ca", {})
        sizes = [b["cacheTokens"] for k, b in seen.items() if isinstance(b, dict)]
        if len(sizes) == len(replicas) and all(size == tokens for size in sizes):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway reads cache sizes {sizes}, not {tokens}")
        await asyncio.sleep(0.1)


async def burst(http: aiohttp.ClientSession, gateway: str, replicas: list[str]) -> list[int]:
    """64 simultaneous first turns sharing one system prompt, through cache-aware."""
    await set_cache_tokens(http, gateway, replicas, BURST_CACHE_TOKENS)
    rng = random.Random(99)
    system = words(rng, 6_000)
    convs = [Conversation(0.0, [words(rng, 400)], system, f"burst-{i}", 0.0) for i in range(64)]
    result = Result()
    t0 = time.monotonic()
    await asyncio.gather(
        *(run_conversation(http, gateway, "cache-aware", replicas, c, t0, result) for c in convs)
    )
    return [s["requests"] for s in await replica_stats(http, replicas)]


def gateway_config(replicas: list[str], cache_aware: dict[str, Any]) -> dict[str, Any]:
    backends = [{"url": f"{url}/v1"} for url in replicas]
    endpoints: dict[str, Any] = {
        "sim-rr": {"backends": backends, "strategy": "weighted-round-robin"},
        "sim-lb": {"backends": backends, "strategy": "least-busy"},
        "sim-ca": {"backends": backends, "strategy": "cache-aware", "cacheAware": cache_aware},
    }
    for i, url in enumerate(replicas):
        endpoints[f"sim-{i}"] = {"url": f"{url}/v1"}
    return {"endpoints": endpoints, "retries": 0, "queueTimeout": 60}


def print_table(name: str, rows: list[dict[str, Any]], cache_tokens: int, replicas: int) -> None:
    # A policy left out (--policies) leaves its ratios out too: the first row stands in.
    by_name = {r["policy"]: r for r in rows}
    oracle = by_name.get("oracle", rows[0])["hit_tokens"] or 1
    rr = by_name.get("round-robin", rows[0])
    lb = by_name.get("least-busy", rows[0])
    print(f"\n## {name}")
    print(
        f"prefix cache: {cache_tokens:,} tokens per replica, {cache_tokens * replicas:,} in all "
        f"({replicas} replicas)\n"
    )
    print(
        "| policy | hit rate | of oracle's hits | max/mean load | TTFT p50 ms | TTFT p90 ms "
        "| p90 vs round robin | p90 vs least-busy | tok/s | vs least-busy | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['policy']} | {r['hit_rate']:.1%} | {r['hit_tokens'] / oracle:.0%} "
            f"| {r['max_mean_load']:.2f} | {r['ttft_p50'] * 1e3:.0f} | {r['ttft_p90'] * 1e3:.0f} "
            f"| {r['ttft_p90'] / rr['ttft_p90']:.2f}x | {r['ttft_p90'] / lb['ttft_p90']:.2f}x "
            f"| {r['throughput']:.0f} | {r['throughput'] / lb['throughput']:.2f}x | {r['errors']} |"
        )
    print(
        f"\nwhere the tail comes from (requests around the p90: median time queued before their "
        f"step and of the step itself, uncached tokens; requests with > {LONG_MISS:,} uncached "
        "tokens; requests that found the batch full; mean replica utilisation; /metrics "
        "scrapes reading KV usage > 95 %, which the saturation filter acts on)"
    )
    print(
        "| policy | queued ms | step ms | uncached | long misses | found batch full | busy "
        "| KV > 95 % |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['policy']} | {r['tail_queued'] * 1e3:.0f} | {r['tail_step'] * 1e3:.0f} "
            f"| {r['tail_uncached']:.0f} | {r['long_misses']:.1%} | {r['found_full']:.1%} "
            f"| {r['utilisation']:.0%} | {r['kv_over']:.1%} |"
        )
    for r in rows:
        if r["decisions"]:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["decisions"].items()))
            print(f"\ncache-aware's decisions (gateway_routing_decisions_total): {reasons}")


async def simulate(args: argparse.Namespace, gateway: str, replicas: list[str]) -> None:
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        for name in args.workloads:
            tokens = args.cache_tokens or CACHE_TOKENS[name]
            await set_cache_tokens(http, gateway, replicas, tokens)
            rows = []
            for policy in args.policies:
                convs = workload(name, args.scale, seed=zlib.crc32(name.encode()))
                # Each policy gets its own content, so no policy finds another's cache.
                salt = f"[{policy}]"
                for c in convs:
                    c.system = salt + c.system
                rows.append(await run_one(http, gateway, replicas, policy, convs))
                print(f"  {name} / {policy}: done", file=sys.stderr, flush=True)
            print_table(name, rows, tokens, len(replicas))
        spread = await burst(http, gateway, replicas)
        share = 64 / len(replicas)
        print(
            f"\n## burst: 64 first turns, one system prompt, cache-aware: per replica {spread}, "
            f"max {max(spread) / share:.2f}x its share"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--scale", type=float, default=1.0, help="sessions and duration")
    parser.add_argument("--quick", action="store_true", help="--scale 0.3")
    parser.add_argument(
        "--workloads", nargs="+", default=["chats", "documents", "unshared"], metavar="NAME"
    )
    parser.add_argument(
        "--policies", nargs="+", default=list(POLICIES), choices=POLICIES, metavar="NAME"
    )
    parser.add_argument(
        "--cache-tokens",
        type=int,
        metavar="N",
        help="every replica's prefix-cache size in tokens, for every workload (default: per "
        "workload, "
        + ", ".join(f"{k} {v:,}" for k, v in CACHE_TOKENS.items())
        + "; see CACHE_TOKENS for why)",
    )
    parser.add_argument(
        "--cache-aware",
        default="{}",
        metavar="JSON",
        help="cache-aware settings to try, e.g. '{\"prefillWait\": false}'",
    )
    parser.add_argument("--replica", type=int, help=argparse.SUPPRESS)  # child mode: a port
    args = parser.parse_args(argv)
    if args.replica:
        run_async(serve_until_signalled(replica_app(ReplicaModel()), args.replica))
        return 0
    if args.quick:
        args.scale = 0.3
    if args.cache_tokens is not None and args.cache_tokens < 16:
        parser.error("--cache-tokens: at least one 16-token block")
    children = Children()
    try:
        replicas = []
        for _ in range(args.replicas):
            port = free_port()
            proc = children.start([sys.executable, __file__, "--replica", str(port)])
            wait_listening(proc, port, "replica", 20)
            replicas.append(f"http://{HOST}:{port}")
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "gateway.json"
            config.write_text(json.dumps(gateway_config(replicas, json.loads(args.cache_aware))))
            port = free_port()
            env = gateway_environment()
            env["LOG_LEVEL"] = "WARNING"
            proc = children.start(
                [sys.executable, "-m", "gateway", "--config", str(config), "--port", str(port)],
                env=env,
            )
            wait_listening(proc, port, "gateway", 30)
            run_async(simulate(args, f"http://{HOST}:{port}", replicas))
    finally:
        children.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())

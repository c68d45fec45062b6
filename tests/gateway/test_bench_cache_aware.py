"""Micro-benchmark of one cache-aware routing decision for a 32k-character conversation over
four backends whose index already holds similar ones (issue 13 asks <= 50 us of CPU).

`make test` runs it once, untimed (`--benchmark-disable`), as a plain test of its result;
`make bench-micro` times it. bench/cache_aware_bench.py splits the figure into the decision
and the bookkeeping after it, in CPU time."""

from __future__ import annotations

import random
import sys
from pathlib import Path

from gateway.backends import Backends
from gateway.cache_aware import CacheAwarePolicy
from gateway.config import GatewayConfig
from gateway.routing import build_route

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from cache_aware_bench import Request, conversation


def test_a_32k_character_decision(benchmark) -> None:
    config = GatewayConfig.model_validate(
        {
            "endpoints": {
                "m": {
                    "backends": [{"url": f"http://10.0.0.{i}:8000/v1"} for i in range(4)],
                    "strategy": "cache-aware",
                }
            }
        }
    )
    route = build_route("m", config.endpoints["m"], config)
    backends = Backends()
    policy = CacheAwarePolicy()
    rng = random.Random(1)
    system = "You are a helpful assistant. " * 40
    for _ in range(50):
        seen = Request(route, {"messages": conversation(rng, 32_000, system)}, {})
        policy.chosen(policy.order(route.targets, backends, seen)[0], backends, seen)
    payload = {"model": "m", "messages": conversation(rng, 32_000, system)}

    def decide_and_record() -> str:
        request = Request(route, payload, {})
        target = policy.order(route.targets, backends, request)[0]
        policy.chosen(target, backends, request)
        return request.routing.reason

    # The system prompt is held somewhere; then the conversation itself is.
    assert benchmark(decide_and_record) in ("prefix", "balance")
    assert decide_and_record() == "prefix"

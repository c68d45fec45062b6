"""Micro-benchmark of one cache-aware routing decision: CPU time per request for a chat
conversation of a given size, over four backends whose index already holds similar ones.

    .venv/bin/python bench/cache_aware_bench.py              # 32k characters, as issue 13 asks
    .venv/bin/python bench/cache_aware_bench.py --chars 8000 --reps 20000

Prints the median over --rounds of the mean CPU time (time.process_time) per decision, split
into the decision (`order`) and the bookkeeping once a backend took the request (`chosen`).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.backends import Backends
from gateway.cache_aware import CacheAwarePolicy
from gateway.config import GatewayConfig
from gateway.routing import Route, build_route


class Request:
    """What the proxy hands a policy (RequestFacts), without the proxy."""

    def __init__(self, route: Route, payload: dict[str, Any], headers: dict[str, str]) -> None:
        self.route = route
        self.payload = payload
        self.headers = headers
        self.routing: Any = None


def conversation(rng: random.Random, chars: int, system: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}]
    total = len(system)
    turn = 0
    while total < chars:
        text = "".join(rng.choice("abcdefghij klmnop") for _ in range(min(800, chars - total)))
        messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": text})
        total += len(text)
        turn += 1
    return messages


SYSTEM = "You are a helpful assistant. " * 40


def warmed_policy(
    chars: int, conversations: int
) -> tuple[Route, Backends, CacheAwarePolicy, random.Random]:
    """A cache-aware route over four backends whose index already holds `conversations`
    conversations of `chars` characters sharing one system prompt, spread by the policy."""
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
    for _ in range(conversations):
        seen = Request(route, {"messages": conversation(rng, chars, SYSTEM)}, {})
        policy.chosen(policy.order(route.targets, backends, seen)[0], backends, seen)
    return route, backends, policy, rng


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=32_000)
    parser.add_argument("--reps", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    route, backends, policy, rng = warmed_policy(args.chars, conversations=200)
    payload = {"model": "m", "messages": conversation(rng, args.chars, SYSTEM)}
    headers = MappingProxyType({"Content-Type": "application/json"})

    decide, record = [], []
    for _ in range(args.rounds):
        requests = [Request(route, payload, dict(headers)) for _ in range(args.reps)]
        start = time.process_time()
        chosen = [policy.order(route.targets, backends, r)[0] for r in requests]
        decide.append((time.process_time() - start) / args.reps)
        start = time.process_time()
        for target, r in zip(chosen, requests, strict=True):
            policy.chosen(target, backends, r)
        record.append((time.process_time() - start) / args.reps)
    size = sum(len(m["content"]) for m in payload["messages"])
    print(f"conversation: {size} characters in {len(payload['messages'])} messages, 4 backends")
    print(f"decision (order):      {statistics.median(decide) * 1e6:6.1f} us CPU")
    print(f"bookkeeping (chosen):  {statistics.median(record) * 1e6:6.1f} us CPU")
    both = statistics.median(decide) + statistics.median(record)
    print(f"together:              {both * 1e6:6.1f} us CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())

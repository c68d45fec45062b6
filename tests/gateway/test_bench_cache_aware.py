"""Micro-benchmark of one cache-aware routing decision for a 32k-character conversation over
four backends whose index already holds similar ones (issue 13 asks <= 50 us of CPU).

`make test` runs it once, untimed (`--benchmark-disable`), as a plain test of its result;
`make bench-micro` times it. bench/cache_aware_bench.py splits the figure into the decision
and the bookkeeping after it, in CPU time."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from cache_aware_bench import SYSTEM, Request, conversation, warmed_policy


def test_a_32k_character_decision(benchmark) -> None:
    route, backends, policy, rng = warmed_policy(32_000, conversations=50)
    payload = {"model": "m", "messages": conversation(rng, 32_000, SYSTEM)}

    def decide_and_record() -> str:
        request = Request(route, payload, {})
        target = policy.order(route.targets, backends, request)[0]
        policy.chosen(target, backends, request)
        return request.routing.reason

    # The system prompt is held somewhere; then the conversation itself is.
    assert benchmark(decide_and_record) in ("prefix", "balance")
    assert decide_and_record() == "prefix"

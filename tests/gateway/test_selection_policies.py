"""Selection policies tested directly, without HTTP: the order each one gives a route's
backends, through the factory the router uses (`make_policy`)."""

from __future__ import annotations

from collections import Counter
from typing import get_args

import pytest
from yarl import URL

from gateway.backends import Backends
from gateway.config import Strategy
from gateway.routing import Target
from gateway.selection import STRATEGIES, make_policy


def target(name: str, weight: float = 1) -> Target:
    return Target(URL(f"http://{name}:8000/v1"), None, None, {}, weight, None)


def firsts(strategy: str, targets: list[Target], backends: Backends, calls: int) -> list[str]:
    policy = make_policy(strategy)
    return [policy.order(targets, backends)[0].base_url.host for _ in range(calls)]


def test_every_configurable_strategy_has_a_policy() -> None:
    assert set(STRATEGIES) == set(get_args(Strategy))


def test_each_call_makes_a_fresh_policy() -> None:
    """Round robin keeps a position, so two routes must not share one policy object."""
    assert make_policy("weighted-round-robin") is not make_policy("weighted-round-robin")


def test_an_unknown_strategy_is_refused() -> None:
    """The config's schema accepts only the registry's names; anything else is a bug."""
    with pytest.raises(KeyError):
        make_policy("no-such-strategy")


def test_every_policy_returns_every_target_once() -> None:
    targets = [target("a", 3), target("b"), target("c", 2)]
    backends = Backends()
    backends.state(targets[2]).in_flight = 5
    for strategy in STRATEGIES:
        policy = make_policy(strategy)
        for _ in range(10):
            assert sorted(policy.order(targets, backends), key=targets.index) == targets


# --- weighted round robin -------------------------------------------------------------------


def test_smooth_weighted_round_robin_interleaves() -> None:
    """nginx's smooth WRR: weights 5:1:1 give a a b a c a a, not a a a a a b c."""
    targets = [target("a", 5), target("b"), target("c")]
    sequence = firsts("weighted-round-robin", targets, Backends(), 14)
    assert sequence == list("aabacaa") * 2


def test_weighted_round_robin_follows_weights_exactly() -> None:
    targets = [target("a", 3), target("b", 1)]
    counts = Counter(firsts("weighted-round-robin", targets, Backends(), 400))
    assert counts == {"a": 300, "b": 100}


def test_weighted_round_robin_ignores_load() -> None:
    targets = [target("a"), target("b")]
    backends = Backends()
    backends.state(targets[0]).in_flight = 50
    assert firsts("weighted-round-robin", targets, backends, 4) == list("abab")


# --- least busy -----------------------------------------------------------------------------


def test_least_busy_orders_by_in_flight_per_weight() -> None:
    busy, heavy, idle = target("busy"), target("heavy", 4), target("idle")
    backends = Backends()
    backends.state(busy).in_flight = 2  # 2 per unit of weight
    backends.state(heavy).in_flight = 4  # 1 per unit of weight
    order = make_policy("least-busy").order([busy, heavy, idle], backends)
    assert [t.base_url.host for t in order] == ["idle", "heavy", "busy"]


def test_least_busy_breaks_ties_at_random() -> None:
    """Equally idle replicas share the load: counted over many calls, not timed. With 1,200
    fair draws among three the expected 400 each is 5 standard deviations above 300."""
    targets = [target("a"), target("b"), target("c")]
    counts = Counter(firsts("least-busy", targets, Backends(), 1200))
    assert set(counts) == {"a", "b", "c"}
    assert min(counts.values()) > 300, counts


@pytest.mark.parametrize("strategy", ["least-busy", "cache-aware"])
def test_equally_loaded_backends_go_in_turn(strategy: str) -> None:
    """Equal loads rotate, the least recently chosen first (a backend chosen a moment ago is
    still prefilling), not at random: every three sequential choices among three idle
    replicas name each once, whichever one starts."""
    targets = [target("a"), target("b"), target("c")]
    backends = Backends()
    policy = make_policy(strategy)
    sequence = []
    for _ in range(30):
        first = policy.order(targets, backends)[0]
        policy.chosen(first, backends, None)
        sequence.append(first.base_url.host)
    assert all(len(set(sequence[i : i + 3])) == 3 for i in range(28)), sequence


def test_the_rotation_follows_where_requests_went() -> None:
    """The proxy may skip the first of the order (at its maxConcurrent): the one that took
    the request is the recently chosen one."""
    a, b, c = targets = [target("a"), target("b"), target("c")]
    backends = Backends()
    policy = make_policy("least-busy")
    for t in (a, b, c, b):
        policy.chosen(t, backends, None)
    assert [t.base_url.host for t in policy.order(targets, backends)] == ["a", "c", "b"]


def test_least_busy_never_puts_a_busier_backend_first() -> None:
    targets = [target("a"), target("b"), target("c")]
    backends = Backends()
    backends.state(targets[1]).in_flight = 1
    counts = Counter(firsts("least-busy", targets, backends, 600))
    assert set(counts) == {"a", "c"}  # never b; a and c still tie, so both are chosen
    assert min(counts.values()) > 200, counts


# --- priority -------------------------------------------------------------------------------


def test_priority_keeps_the_configured_order_whatever_the_load() -> None:
    targets = [target("primary"), target("fallback"), target("last")]
    backends = Backends()
    backends.state(targets[0]).in_flight = 100
    order = make_policy("priority").order(targets, backends)
    assert order == targets

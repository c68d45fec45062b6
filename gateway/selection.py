"""Selection policies: small interchangeable objects that order a route's backends for a
request. The proxy tries them in that order, skipping ones that cannot take it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.backends import Backends
from gateway.cache_aware import CacheAwarePolicy, RequestFacts
from gateway.recency import Recency
from gateway.routing import Route, Target


class Policy(Protocol):
    def order(
        self, targets: Sequence[Target], backends: Backends, request: RequestFacts | None = None
    ) -> list[Target]:
        """Every target, best first. `request` is there for the policies that look at it."""
        ...

    def chosen(self, target: Target, backends: Backends, request: RequestFacts | None) -> None:
        """The request went to `target` (already counted in): a policy with memory notes it."""
        ...


class _Forgetful:
    """A policy that needs no word of where a request went."""

    def chosen(self, target: Target, backends: Backends, request: RequestFacts | None) -> None:
        pass


class LeastBusy:
    """Fewest requests in flight per unit of weight; equally loaded backends go in turn, the
    one chosen least recently first (see Recency: random ties cost tail latency), so equally
    idle replicas share the load instead of the first one getting everything."""

    def __init__(self) -> None:
        self.recency = Recency()

    def order(
        self, targets: Sequence[Target], backends: Backends, request: RequestFacts | None = None
    ) -> list[Target]:
        rank = self.recency.rank
        return sorted(
            targets,
            key=lambda t: (backends.state(t).in_flight / t.weight, rank(t.key)),
        )

    def chosen(self, target: Target, backends: Backends, request: RequestFacts | None) -> None:
        self.recency.chosen(target.key)


class WeightedRoundRobin(_Forgetful):
    """Smooth weighted round robin (as nginx does it): weights 5:1:1 give a a b a c a a,
    not a a a a a b c."""

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def order(
        self, targets: Sequence[Target], backends: Backends, request: RequestFacts | None = None
    ) -> list[Target]:
        total = sum(t.weight for t in targets)
        for t in targets:
            self._current[t.key] = self._current.get(t.key, 0.0) + t.weight
        ranked = sorted(targets, key=lambda t: self._current[t.key], reverse=True)
        self._current[ranked[0].key] -= total
        return ranked


class Priority(_Forgetful):
    """In the order configured: the first is the primary, the rest are fallbacks."""

    def order(
        self, targets: Sequence[Target], backends: Backends, request: RequestFacts | None = None
    ) -> list[Target]:
        return list(targets)


# Every strategy the config accepts (`strategy`), by name: each call makes a fresh policy.
STRATEGIES: dict[str, Callable[[], Policy]] = {
    "least-busy": LeastBusy,
    "weighted-round-robin": WeightedRoundRobin,
    "priority": Priority,
    "cache-aware": CacheAwarePolicy,
}


def make_policy(strategy: str) -> Policy:
    """A new policy for a strategy name; an unknown name is a KeyError (the config's schema
    accepts only the names above)."""
    return STRATEGIES[strategy]()


class Policies:
    """One policy object per route (round robin keeps a position), kept across reloads."""

    def __init__(self) -> None:
        self._by_route: dict[tuple[str, str], Policy] = {}

    def for_route(self, route: Route) -> Policy:
        key = (route.public_id, route.strategy)
        policy = self._by_route.get(key)
        if policy is None:
            policy = self._by_route[key] = make_policy(route.strategy)
        return policy

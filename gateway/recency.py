"""Ties between equally loaded backends: the one a route chose least recently goes first."""

from __future__ import annotations

import random

# Backends remembered per route; past this the least recently chosen is forgotten (it then
# counts as never chosen, which puts it first among its equals: harmless). Bounds a route
# whose DNS-discovered replicas come and go for months.
REMEMBERED = 1024


class Recency:
    """When each backend of a route was last chosen, by a counter (not a clock).

    Equal in-flight counts do not mean equal backends: the one that took a request a moment
    ago is still running that request's prefill, and a request sent there waits behind it.
    The one chosen longest ago is the likeliest to be past its prefills, so equally loaded
    backends rotate as round robin does. Random ties cost tail latency that round robin does
    not pay: in bench/routing_sim.py's unshared workload least-busy's TTFT p90 was 1.6x round
    robin's with random ties. Backends never chosen yet tie at random, so that two gateways
    (or two --workers processes) starting together do not all begin with the same one."""

    __slots__ = ("_count", "_last")

    def __init__(self) -> None:
        self._last: dict[str, int] = {}  # in order of choice, least recent first
        self._count = 0

    def chosen(self, key: str) -> None:
        self._count += 1
        self._last.pop(key, None)
        self._last[key] = self._count
        if len(self._last) > REMEMBERED:
            del self._last[next(iter(self._last))]

    def rank(self, key: str) -> tuple[int, float]:
        """A sort key among equals: never chosen first (at random among them), then the least
        recently chosen."""
        last = self._last.get(key)
        return (last, 0.0) if last is not None else (0, random.random())

    def retain(self, keys: frozenset[str]) -> None:
        """Forget the backends a reload removed."""
        for key in [k for k in self._last if k not in keys]:
            del self._last[key]

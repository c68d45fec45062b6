"""The `cache-aware` selection policy: each conversation goes to the backend whose KV cache
holds its prefix (or that served its session last), unless that would make a hotspot."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.backends import Backends
from gateway.config import CacheAware as Settings
from gateway.load_signals import LoadSignals, Signals
from gateway.prefix_index import (
    CHARS_PER_TOKEN,
    DEFAULT_CACHE_TOKENS,
    PrefixIndex,
    block_chars,
    block_hashes,
    request_text,
)
from gateway.routing import Target

Reason = Literal["session", "prefix", "balance", "cold"]
REASONS: tuple[Reason, ...] = ("session", "prefix", "balance", "cold")


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a policy may know of a request: its parsed JSON body (None when not JSON) and
    its headers. Policies that do not look at requests ignore it."""

    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


NO_FACTS = RequestFacts()


@dataclass(slots=True)
class Decision:
    """The outcome of one `decide`: the order to try, why, and what to record once a
    backend has taken the request."""

    order: list[Target]
    reason: Reason
    matched_tokens: int = 0
    hashes: list[int] = field(default_factory=list)
    session: str | None = None


class CacheAwarePolicy:
    """One route's policy: its prefix index, its sessions, and the decision.

    The decision, in order: backends that are not healthy are left out of the index (and
    lose their part of it: their cache is gone when they come back); saturated ones (at
    maxConcurrent, or their scraped queue or KV usage over the thresholds) are filtered out
    first, as llm-d does, so one drowning backend does not make the fleet look imbalanced.
    Then the preferred backend is the session's last one, else the longest prefix match.
    The load guard (imbalance as SGLang, bounded loads) may overrule it; no useful match
    goes to the least loaded, ties at random."""

    def __init__(self, signals: LoadSignals | None = None) -> None:
        self.signals = signals or LoadSignals()
        self.index = PrefixIndex()
        self.sessions: OrderedDict[str, str] = OrderedDict()
        self._keys: frozenset[str] = frozenset()

    # -- the Policy interface -----------------------------------------------------------

    def order(
        self,
        targets: Sequence[Target],
        backends: Backends,
        request: RequestFacts = NO_FACTS,
        settings: Settings | None = None,
        model: str = "",
        now: float = 0.0,
    ) -> list[Target]:
        return self.decide(targets, backends, request, settings or Settings(), model, now).order

    # -- the decision -------------------------------------------------------------------

    def load(self, target: Target, backends: Backends, settings: Settings, now: float) -> float:
        """Requests on a backend per unit of weight: our exact in-flight count, or what the
        backend itself reports (running + waiting, counting other gateways' requests too)
        when that is more and fresh."""
        load = float(backends.state(target).in_flight)
        reading = self.signals.fresh(target.key, now, settings.metrics_stale_after)
        if reading is not None and reading.running is not None:
            load = max(load, reading.running + (reading.waiting or 0.0))
        return load / target.weight

    def saturated(self, target: Target, backends: Backends, settings: Settings, now: float) -> bool:
        if (
            target.max_concurrent is not None
            and backends.state(target).in_flight >= target.max_concurrent
        ):
            return True
        reading = self.signals.fresh(target.key, now, settings.metrics_stale_after)
        if reading is None:
            return False
        return (reading.waiting or 0.0) > settings.max_waiting or (
            reading.kv_usage or 0.0
        ) > settings.max_kv_usage

    def decide(
        self,
        targets: Sequence[Target],
        backends: Backends,
        request: RequestFacts,
        settings: Settings,
        model: str,
        now: float,
    ) -> Decision:
        self._follow_reloads(targets)
        healthy: list[Target] = []
        for t in targets:
            if backends.state(t).health(now) == "healthy":
                healthy.append(t)
            else:
                self.index.drop(t.key)
        candidates = [t for t in healthy if not self.saturated(t, backends, settings, now)]
        if not candidates:
            # Everything is saturated or resting: the least loaded of what is left, and the
            # proxy waits for a slot or answers 503 as with any other policy.
            ranked = self._by_load(list(targets), backends, settings, now)
            return Decision(ranked, "balance")
        loads = {t.key: self.load(t, backends, settings, now) for t in candidates}
        by_load = sorted(candidates, key=lambda t: (loads[t.key], random.random()))
        rest = [t for t in targets if t.key not in loads]
        body = request.body

        session = _session_id(request.headers, settings.session_headers)
        hashes: list[int] = []
        text = request_text(body) if body is not None else None
        if text is not None:
            hashes = block_hashes(text, model)

        preferred: Target | None = None
        reason: Reason = "cold"
        matched = 0
        if session is not None:
            key = self.sessions.get(session)
            if key is not None:
                preferred = next((t for t in candidates if t.key == key), None)
                if preferred is not None:
                    reason = "session"
                    matched = self._matched(preferred, hashes)
        if preferred is None and hashes:
            preferred, matched = self._best_match(candidates, hashes, loads)
            min_blocks_chars = settings.min_match_tokens * CHARS_PER_TOKEN
            if preferred is not None and block_chars(matched) >= min_blocks_chars:
                reason = "prefix"
            else:
                preferred, matched = None, 0

        if preferred is not None and not self._within_bounds(preferred, loads, settings):
            # The guard: another backend under the bound that holds the most of the prefix,
            # or the least loaded when the whole fleet is out of balance.
            reason = "balance"
            if self._imbalanced(loads, settings):
                preferred, matched = by_load[0], self._matched(by_load[0], hashes)
            else:
                bound = self._bound(loads, settings)
                under = [t for t in candidates if loads[t.key] <= bound]
                preferred, matched = self._best_match(under or by_load[:1], hashes, loads)
                if preferred is None:
                    preferred = by_load[0]
        if preferred is None:
            preferred = by_load[0]
        order = [preferred, *(t for t in by_load if t is not preferred), *rest]
        matched_tokens = block_chars(matched) // CHARS_PER_TOKEN if matched else 0
        return Decision(order, reason, matched_tokens, hashes, session)

    def record(
        self, target: Target, decision: Decision, backends: Backends, settings: Settings, now: float
    ) -> None:
        """The request went to `target` (counted in before this is called): its prefix is in
        that backend's cache now, and its session follows it."""
        state = backends.state(target)
        if state.health(now) != "healthy":
            return  # a probe of a resting backend: its part is rebuilt once it is back
        if decision.hashes:
            self.index.part(target.key, self._capacity(target)).add(decision.hashes)
        if decision.session is not None:
            self.sessions[decision.session] = target.key
            self.sessions.move_to_end(decision.session)
            while len(self.sessions) > settings.max_sessions:
                self.sessions.popitem(last=False)

    # -- pieces -------------------------------------------------------------------------

    def _capacity(self, target: Target) -> int:
        if target.cache_tokens is not None:
            return target.cache_tokens
        reading: Signals | None = self.signals.readings.get(target.key)
        if reading is not None and reading.cache_tokens:
            return reading.cache_tokens
        return DEFAULT_CACHE_TOKENS

    def _follow_reloads(self, targets: Sequence[Target]) -> None:
        keys = frozenset(t.key for t in targets)
        if keys != self._keys:
            self.index.retain(keys)
            gone = self._keys - keys
            if gone:
                for session in [s for s, k in self.sessions.items() if k in gone]:
                    del self.sessions[session]
            self._keys = keys

    def _matched(self, target: Target, hashes: list[int]) -> int:
        part = self.index.parts.get(target.key)
        return part.matched(hashes) if part is not None and hashes else 0

    def _best_match(
        self, among: Sequence[Target], hashes: list[int], loads: Mapping[str, float]
    ) -> tuple[Target | None, int]:
        """The longest match; equal matches go to the less loaded, then at random."""
        best: Target | None = None
        best_key = (0, 0.0, 0.0)
        for t in among:
            matched = self._matched(t, hashes)
            if not matched:
                continue
            key = (matched, -loads[t.key], random.random())
            if best is None or key > best_key:
                best, best_key = t, key
        return best, best_key[0]

    def _bound(self, loads: Mapping[str, float], settings: Settings) -> float:
        mean = sum(loads.values()) / len(loads)
        return max((1 + settings.epsilon) * mean, mean + settings.margin)

    def _imbalanced(self, loads: Mapping[str, float], settings: Settings) -> bool:
        high, low = max(loads.values()), min(loads.values())
        return high - low > settings.balance_abs and high > settings.balance_rel * low

    def _within_bounds(
        self, target: Target, loads: Mapping[str, float], settings: Settings
    ) -> bool:
        if self._imbalanced(loads, settings):
            return loads[target.key] == min(loads.values())
        return loads[target.key] <= self._bound(loads, settings)

    def _by_load(
        self, targets: list[Target], backends: Backends, settings: Settings, now: float
    ) -> list[Target]:
        loads = {t.key: self.load(t, backends, settings, now) for t in targets}
        return sorted(targets, key=lambda t: (loads[t.key], random.random()))

    def describe(self, now: float, stale_after: float) -> dict[str, dict[str, object]]:
        """Per backend, for /debug: index size and the scraped signals with their age."""
        out: dict[str, dict[str, object]] = {}
        for key, part in self.index.parts.items():
            out[key] = {"indexBlocks": len(part), "indexTokens": part.tokens}
        return out


def _session_id(headers: Mapping[str, str], names: Sequence[str]) -> str | None:
    for name in names:
        value = headers.get(name)
        if value:
            return value
    return None

"""The `cache-aware` selection policy: each conversation goes to the backend whose KV cache
holds its prefix (or that served its session last), unless that would make a hotspot."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

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
from gateway.recency import Recency
from gateway.routing import Route, Target

Reason = Literal["session", "prefix", "balance", "cold"]
REASONS: tuple[Reason, ...] = ("session", "prefix", "balance", "cold")


class RequestFacts(Protocol):
    """What a policy may know of a request (the proxy's ProxiedRequest is one): its route,
    its headers, its parsed JSON body, and a slot where a policy keeps its decision until the
    request is sent."""

    route: Route
    routing: Any

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def payload(self) -> Mapping[str, Any] | None: ...


@dataclass(slots=True)
class Decision:
    """The outcome of one decision: the order to try, why, and what to record once a
    backend has taken the request."""

    order: list[Target]
    reason: Reason
    matched_tokens: int = 0
    hashes: list[int] = field(default_factory=list)
    session: str | None = None
    tokens: int = 0  # the request's estimated prompt tokens
    held: dict[str, int] = field(default_factory=dict)  # blocks each backend holds, by key

    def uncached(self, target: Target) -> int:
        """The estimated prompt tokens `target` must prefill for this request."""
        held = self.held.get(target.key)
        if not held:
            return self.tokens
        return max(0, self.tokens - block_chars(held) // CHARS_PER_TOKEN)


@dataclass(slots=True)
class _Fleet:
    """The backends a decision chooses among, with their loads, least loaded first."""

    candidates: list[Target]
    loads: dict[str, float]
    by_load: list[Target]

    def bound(self, settings: Settings) -> float:
        """Bounded loads: nobody above max((1 + epsilon) x mean, mean + margin)."""
        mean = sum(self.loads.values()) / len(self.loads)
        return max((1 + settings.epsilon) * mean, mean + settings.margin)

    def imbalanced(self, settings: Settings) -> bool:
        """SGLang's test: max - min above an absolute margin and max above a ratio of min."""
        high, low = max(self.loads.values()), min(self.loads.values())
        return high - low > settings.balance_abs and high > settings.balance_rel * low


class CacheAwarePolicy:
    """One route's policy: its prefix index, its sessions, and the decision.

    The decision, in order: backends that are not healthy are left out of the index (and
    lose their part of it: their cache is gone when they come back); saturated ones (at
    maxConcurrent, or their scraped queue or KV usage over the thresholds) are filtered out
    first, as llm-d does, so one drowning backend does not make the fleet look imbalanced.
    Then the preferred backend is the session's last one, else the longest prefix match.
    The load guard (imbalance as SGLang, bounded loads) may overrule it; no useful match
    goes to the least loaded. Equal loads go to the backend chosen least recently (Recency),
    in every step."""

    def __init__(self, signals: LoadSignals | None = None) -> None:
        self.signals = signals or LoadSignals()
        self.index = PrefixIndex()
        self.recency = Recency()
        self.sessions: OrderedDict[str, str] = OrderedDict()
        self._keys: frozenset[str] = frozenset()

    # -- the Policy interface -----------------------------------------------------------

    def order(
        self, targets: Sequence[Target], backends: Backends, request: RequestFacts | None = None
    ) -> list[Target]:
        if request is None:  # nothing known of the request: by load alone
            settings = Settings()
            return self._by_load(list(targets), backends, settings, time.monotonic())
        decision = self.decide(targets, backends, request, time.monotonic())
        request.routing = decision
        return decision.order

    def chosen(self, target: Target, backends: Backends, request: RequestFacts | None) -> None:
        self.recency.chosen(target.key)
        decision = None if request is None else request.routing
        if isinstance(decision, Decision):
            self.record(target, decision, backends, request.route.cache_aware, time.monotonic())

    # -- the decision -------------------------------------------------------------------

    def load(self, target: Target, backends: Backends, settings: Settings, now: float) -> float:
        """Requests on a backend per unit of weight: our exact in-flight count, plus the
        requests of others (other gateways, other --workers processes) that its last fresh
        reading showed beyond ours. Not the reading itself: it lags by up to an interval, and
        a backend that just finished a burst would look busy for that long."""
        load = float(backends.state(target).in_flight)
        reading = self.signals.fresh(target.key, now, settings.metrics_stale_after)
        if reading is not None:
            load += reading.others() or 0.0
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
        self, targets: Sequence[Target], backends: Backends, request: RequestFacts, now: float
    ) -> Decision:
        settings = request.route.cache_aware
        fleet = self._fleet(targets, backends, settings, now)
        if fleet is None:
            # Everything is saturated or resting: the least loaded of what is left, and the
            # proxy waits for a slot or answers 503 as with any other policy.
            return Decision(self._by_load(list(targets), backends, settings, now), "balance")
        payload = request.payload
        text = request_text(payload) if payload is not None else None
        hashes = block_hashes(text, request.route.public_id) if text is not None else []
        held = {t.key: self._matched(t, hashes) for t in fleet.candidates} if hashes else {}
        session = _session_id(request.headers, settings.session_headers)
        preferred, reason = self._preferred(fleet, held, session, settings)
        if preferred is not None and not self._within_bounds(preferred, fleet, settings):
            preferred = self._instead(fleet, held, settings)
            reason = "balance"
        if preferred is None:
            preferred = fleet.by_load[0]
        tokens = len(text or "") // CHARS_PER_TOKEN
        decision = Decision([], reason, 0, hashes, session, tokens, held)
        if settings.prefill_wait:
            quicker = self._quicker(preferred, fleet, decision, backends, settings)
            if quicker is not None:
                preferred, decision.reason = quicker, "balance"
        rest = [t for t in targets if t.key not in fleet.loads]
        decision.order = [preferred, *(t for t in fleet.by_load if t is not preferred), *rest]
        matched = held.get(preferred.key, 0)
        decision.matched_tokens = block_chars(matched) // CHARS_PER_TOKEN if matched else 0
        return decision

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
            self.recency.retain(keys)
            gone = self._keys - keys
            if gone:
                for session in [s for s, k in self.sessions.items() if k in gone]:
                    del self.sessions[session]
            self._keys = keys

    def _matched(self, target: Target, hashes: list[int]) -> int:
        part = self.index.parts.get(target.key)
        return part.matched(hashes) if part is not None and hashes else 0

    def _best_match(
        self, among: Sequence[Target], held: Mapping[str, int], loads: Mapping[str, float]
    ) -> Target | None:
        """The longest match; equal matches go to the less loaded, then the least recently
        chosen."""
        best: Target | None = None
        best_key: tuple[int, float, tuple[int, float]] = (0, 0.0, (0, 0.0))
        rank = self.recency.rank
        for t in among:
            matched = held.get(t.key)
            if not matched:
                continue
            key = (-matched, loads[t.key], rank(t.key))  # the smallest is the best
            if best is None or key < best_key:
                best, best_key = t, key
        return best

    def _quicker(
        self,
        preferred: Target,
        fleet: _Fleet,
        decision: Decision,
        backends: Backends,
        settings: Settings,
    ) -> Target | None:
        """A backend that would answer sooner than `preferred`, if one would by more than
        `prefillSlack` tokens: the estimated wait is the prefill queued ahead there (our
        requests that have not answered yet) plus this request's own uncached prefill, as
        Dynamo's KV router weighs them. Only backends the guard allows compete.

        A move also copies what `preferred` holds of the request to a second cache, where it
        evicts as much of what that cache holds, which some later request prefills again: so
        the tokens a backend would have to copy count twice, once as this request's prefill
        and once as that later one's. A short history moves past a long prefill; a long
        shared document stays where it is held unless the queue there is longer than copying
        it twice (at 24k-token caches, moving documents off their replica lost a tenth of the
        fleet's hits in bench/routing_sim.py's workload (b))."""
        if fleet.imbalanced(settings):
            low = fleet.loads[fleet.by_load[0].key]
            allowed = [t for t in fleet.candidates if fleet.loads[t.key] == low]
        else:
            bound = fleet.bound(settings)
            allowed = [t for t in fleet.candidates if fleet.loads[t.key] <= bound]

        copied = decision.tokens - decision.uncached(preferred)  # what preferred holds of it

        def cost(t: Target) -> int:
            uncached = decision.uncached(t)
            copy = max(0, copied - (decision.tokens - uncached))  # held there too: no copy
            return backends.state(t).prefill_tokens + uncached + copy

        best, best_cost = None, cost(preferred) - settings.prefill_slack
        for t in allowed:
            if t is not preferred:
                theirs = cost(t)
                if theirs < best_cost:
                    best, best_cost = t, theirs
        return best

    def _within_bounds(self, target: Target, fleet: _Fleet, settings: Settings) -> bool:
        if fleet.imbalanced(settings):
            return fleet.loads[target.key] == fleet.loads[fleet.by_load[0].key]
        return fleet.loads[target.key] <= fleet.bound(settings)

    def _fleet(
        self, targets: Sequence[Target], backends: Backends, settings: Settings, now: float
    ) -> _Fleet | None:
        """Healthy, unsaturated backends and their loads (all the healthy ones with a free slot
        when every one is saturated). One that is not healthy is left out and loses its part
        of the index: its cache is gone when it is back."""
        self._follow_reloads(targets)
        healthy = []
        for t in targets:
            if backends.state(t).health(now) == "healthy":
                healthy.append(t)
            else:
                self.index.drop(t.key)
        candidates = [t for t in healthy if not self.saturated(t, backends, settings, now)]
        if not candidates:
            # Every one is saturated: the filter tells them apart no more, so the index and
            # the guard choose among them all (the guard still spreads the load).
            candidates = [
                t
                for t in healthy
                if t.max_concurrent is None or backends.state(t).in_flight < t.max_concurrent
            ]
        if not candidates:
            return None
        loads = {t.key: self.load(t, backends, settings, now) for t in candidates}
        rank = self.recency.rank
        by_load = sorted(candidates, key=lambda t: (loads[t.key], rank(t.key)))
        return _Fleet(candidates, loads, by_load)

    def _preferred(
        self, fleet: _Fleet, held: Mapping[str, int], session: str | None, settings: Settings
    ) -> tuple[Target | None, Reason]:
        """The session's last backend, else the longest useful prefix match, else none."""
        if session is not None:
            key = self.sessions.get(session)
            target = next((t for t in fleet.candidates if t.key == key), None)
            if target is not None:
                return target, "session"
        if held:
            target = self._best_match(fleet.candidates, held, fleet.loads)
            if target is not None and block_chars(held[target.key]) >= (
                settings.min_match_tokens * CHARS_PER_TOKEN
            ):
                return target, "prefix"
        return None, "cold"

    def _instead(self, fleet: _Fleet, held: Mapping[str, int], settings: Settings) -> Target:
        """The guard overruled the preferred backend: the least loaded when the fleet is out
        of balance, else the backend under the bound that holds the most of the prefix (the
        least loaded of those, or at all, when none holds any)."""
        least = fleet.by_load[0]
        if fleet.imbalanced(settings):
            return least
        bound = fleet.bound(settings)
        under = [t for t in fleet.candidates if fleet.loads[t.key] <= bound]
        target = self._best_match(under, held, fleet.loads)
        return target if target is not None else least

    def _by_load(
        self, targets: list[Target], backends: Backends, settings: Settings, now: float
    ) -> list[Target]:
        loads = {t.key: self.load(t, backends, settings, now) for t in targets}
        rank = self.recency.rank
        return sorted(targets, key=lambda t: (loads[t.key], rank(t.key)))

    def describe(self, route: Route, backends: Backends, now: float) -> dict[str, object]:
        """For /debug: per backend (by label), its part of the index, its in-flight count and
        queued prefill estimate, and its scraped signals with their age (or why there are none)."""
        out: dict[str, object] = {"sessions": len(self.sessions)}
        for t in route.targets:
            part = self.index.parts.get(t.key)
            reading = self.signals.readings.get(t.key)
            out[t.label] = {
                "indexBlocks": len(part) if part is not None else 0,
                "indexTokens": part.tokens if part is not None else 0,
                "cacheTokens": self._capacity(t),
                "inFlight": backends.state(t).in_flight,
                "prefillTokens": backends.state(t).prefill_tokens,
                "signals": reading.as_dict(now) if reading is not None else None,
                "stale": self.signals.fresh(t.key, now, route.cache_aware.metrics_stale_after)
                is None,
                "scrapeError": self.signals.errors.get(t.key),
            }
        return out


def _session_id(headers: Mapping[str, str], names: Sequence[str]) -> str | None:
    for name in names:
        value = headers.get(name)
        if value:
            return value
    return None

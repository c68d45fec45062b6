"""Live state of every backend server: load, passive health (a circuit breaker), slots.

State is keyed by the server's identity (`Target.key`), not by route, so two models served
by one server share its health, and it survives reloads that keep the server."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Literal

import structlog

from gateway.config import CircuitBreaker
from gateway.routing import Target

log = structlog.get_logger("gateway.backends")

Health = Literal["healthy", "ejected", "half-open"]


@dataclass
class BackendState:
    label: str
    in_flight: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    probing: bool = False  # a half-open probe is out: nothing else goes until it answers
    ejections: int = 0
    requests: int = 0
    failures: int = 0
    last_error: str | None = None
    refuses_stream_options: bool = False
    # Estimated prompt tokens still to prefill there: the uncached part of each of our
    # requests that has not answered yet (cache-aware routes only; see Backends.prefilling).
    prefill_tokens: int = 0

    def health(self, now: float) -> Health:
        if self.ejected_until == 0.0:
            return "healthy"
        return "ejected" if now < self.ejected_until else "half-open"

    def as_dict(self, now: float) -> dict[str, object]:
        return {
            "state": self.health(now),
            "inFlight": self.in_flight,
            "consecutiveFailures": self.consecutive_failures,
            "ejections": self.ejections,
            "ejectedForSeconds": round(max(0.0, self.ejected_until - now), 1),
            "requests": self.requests,
            "failures": self.failures,
            "lastError": self.last_error,
        }


@dataclass(slots=True)
class Ticket:
    """One request's hold on a backend, from `begin` to `end`."""

    state: BackendState
    probe: bool  # sent while the breaker was half-open: its outcome decides
    prefill: int = 0  # its share of state.prefill_tokens, until it answers


@dataclass
class Backends:
    """The registry; one per gateway process."""

    states: dict[str, BackendState] = field(default_factory=dict)
    # Set whenever a slot frees up or a backend comes back: requests waiting for one retry.
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def state(self, target: Target) -> BackendState:
        state = self.states.get(target.key)
        if state is None:
            state = self.states[target.key] = BackendState(target.label)
        return state

    def retain(self, keys: set[str]) -> None:
        """After a reload: forget servers no longer configured (unless requests still use them)."""
        for key in list(self.states):
            if key not in keys and self.states[key].in_flight == 0:
                del self.states[key]

    # -- admission -------------------------------------------------------------------------

    def can_take(self, target: Target, now: float) -> bool:
        """Whether a request may go to this backend now (health and maxConcurrent)."""
        state = self.state(target)
        if target.max_concurrent is not None and state.in_flight >= target.max_concurrent:
            return False
        health = state.health(now)
        return health == "healthy" or (health == "half-open" and not state.probing)

    def begin(self, target: Target, now: float) -> Ticket:
        """Count the request in before it is sent (load accounting must be exact)."""
        state = self.state(target)
        probe = state.health(now) == "half-open"
        if probe:
            state.probing = True
        state.in_flight += 1
        state.requests += 1
        return Ticket(state, probe)

    def prefilling(self, ticket: Ticket, tokens: int) -> None:
        """The request's prompt costs about `tokens` of prefill there: a request sent after
        it waits behind that until it answers (`answered`, or `end` on any other path)."""
        ticket.prefill = tokens
        ticket.state.prefill_tokens += tokens

    def answered(self, ticket: Ticket) -> None:
        """Its first event (or whole body) arrived: its prefill is done."""
        if ticket.prefill:
            ticket.state.prefill_tokens -= ticket.prefill
            ticket.prefill = 0

    def end(self, ticket: Ticket) -> None:
        """The request is over. A probe that ended without a verdict (its client went away)
        must not leave the backend waiting for one forever: the next request probes."""
        state = ticket.state
        self.answered(ticket)
        state.in_flight -= 1
        if ticket.probe:
            state.probing = False
        self._wake()

    async def wait_for_change(self, at_most: float) -> None:
        self._changed.clear()
        try:
            async with asyncio.timeout(at_most):
                await self._changed.wait()
        except TimeoutError:
            pass

    def _wake(self) -> None:
        self._changed.set()

    # -- passive health --------------------------------------------------------------------

    def succeeded(self, ticket: Ticket) -> None:
        """A request completed well. Only the half-open probe closes an open breaker: a
        request that was already under way when the backend was ejected proves nothing."""
        state = ticket.state
        if state.ejected_until and not ticket.probe:
            return
        if state.ejected_until:
            log.info("backend recovered", backend=state.label)
            self._wake()
        state.consecutive_failures = 0
        state.ejected_until = 0.0
        state.probing = False

    def failed(self, ticket: Ticket, breaker: CircuitBreaker, error: str) -> None:
        state = ticket.state
        now = time.monotonic()
        state.failures += 1
        state.consecutive_failures += 1
        state.last_error = error
        reopen = ticket.probe or state.health(now) == "half-open"
        if ticket.probe:
            state.probing = False
        if reopen or state.consecutive_failures >= breaker.failures:
            if state.health(now) != "ejected":
                state.ejections += 1
                log.warning(
                    "backend ejected",
                    backend=state.label,
                    consecutive_failures=state.consecutive_failures,
                    cooldown_s=breaker.cooldown,
                    error=error,
                )
            state.ejected_until = now + breaker.cooldown

"""Getting a response from one of a route's backends: selection, maxConcurrent slots, and
retries with backoff, all before a byte has reached the client."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import aiohttp
import structlog
from multidict import CIMultiDictProxy

from gateway.backends import Backends, Ticket
from gateway.observe import RequestRecord
from gateway.routing import Hop, Route, Target
from gateway.selection import Policies
from gateway.upstream import (
    BodyReader,
    Deadline,
    UpstreamError,
    forward_headers,
    send,
    upstream_url,
)
from wire.sse import EventTooLarge, SSESplitter

log = structlog.get_logger("gateway.failover")

BACKOFF_BASE = 0.1  # seconds before the first retry of the same backend, doubling each time
BACKOFF_CAP = 2.0
# A Retry-After longer than this is not waited out: another backend is tried, or the
# backend's answer goes to the client.
RETRY_AFTER_CAP = 10.0


class NoBackend(Exception):
    """No backend could take the request; `status` and `retry_after` say what to answer."""

    def __init__(self, status: int, code: str, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass(slots=True)
class Sent:
    """A backend's response and its slot: status and headers in, and `head`, the body's
    start already read (a stream's first event, or a whole JSON body when `complete`)."""

    hop: Hop
    response: aiohttp.ClientResponse
    ticket: Ticket
    head: bytes
    complete: bool
    usage_added: bool = False  # the gateway asked for usage: the client must not see it


def is_event_stream(response: aiohttp.ClientResponse) -> bool:
    content_type = response.headers.get("Content-Type", "").lower()
    return content_type.startswith("text/event-stream") and response.status < 400


def is_json_like(response: aiohttp.ClientResponse) -> bool:
    return "json" in response.headers.get("Content-Type", "").lower() or response.status >= 400


async def prefetch(
    response: aiohttp.ClientResponse, hop: Hop, deadline: Deadline
) -> tuple[bytes, bool]:
    """Read what must arrive before the client is answered: a stream's first whole event,
    or a whole JSON (or error) body. Other bodies (audio, images) are not read ahead."""
    reader = BodyReader(response, hop, deadline)
    if is_event_stream(response):
        splitter = SSESplitter()
        head = bytearray()
        while chunk := await reader.read():
            head += chunk
            try:
                if splitter.feed(chunk):
                    return bytes(head), reader.at_eof()
            except EventTooLarge as exc:
                raise UpstreamError("event_too_large", 502, str(exc)) from None
        if splitter.pending.strip():
            raise UpstreamError(
                "died", 502, f"backend for model '{hop.public_id}' ended the stream inside an event"
            )
        return bytes(head), True
    if is_json_like(response):
        body = bytearray()
        await reader.read_all(body)
        return bytes(body), True
    return b"", False


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff(attempt: int) -> float:
    """Exponential with full jitter in [0.5, 1.5): retries from many clients do not align."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt) * (0.5 + random.random())


@dataclass
class Failover:
    """One request's attempts at a route."""

    session: aiohttp.ClientSession
    backends: Backends
    policies: Policies
    route: Route
    model: str
    record: RequestRecord
    deadline: Deadline

    async def send(
        self,
        method: str,
        tail: str,
        raw_query: str,
        client_headers: CIMultiDictProxy[str],
        body_for: Callable[[Hop, bool], bytes],
        content_type: str | None,
        wants_usage: bool = False,
    ) -> Sent:
        route = self.route
        tried: set[str] = set()
        waited_until = time.monotonic() + route.queue_timeout
        attempt = 0
        waited = False  # a Retry-After was just waited out: no backoff on top
        while True:
            target = self._choose(tried)
            if target is None:
                await self._wait_for_a_slot(waited_until)
                continue
            if target.key in tried and attempt and not waited:
                await self._sleep(backoff(attempt - 1))
            waited = False
            tried.add(target.key)
            ticket = self.backends.begin(target, time.monotonic())
            hop = route.hop(self.model, target)
            self.record.backend = hop.backend
            self.record.upstream_model = hop.upstream_model
            self.record.attempts += 1
            headers = forward_headers(client_headers, hop, self.record.request_id)
            if content_type and "Content-Type" not in headers:
                headers["Content-Type"] = content_type
            url = upstream_url(hop, tail, raw_query)
            last_attempt = attempt >= route.retries
            # Ask for usage unless this backend is known to refuse stream_options.
            ask_usage = wants_usage and not ticket.state.refuses_stream_options
            response: aiohttp.ClientResponse | None = None
            try:
                response = await send(
                    self.session, hop, method, url, headers, body_for(hop, ask_usage), self.deadline
                )
                if ask_usage and response.status in (400, 422):
                    # Ollama, LM Studio, TGI and LocalAI refuse stream_options: remember it
                    # and send the request as the client wrote it (not counted as an attempt).
                    log.info("backend refuses stream_options", backend=hop.backend)
                    ticket.state.refuses_stream_options = True
                    self._discard(response, ticket)
                    tried.discard(target.key)
                    continue
                if response.status in route.retry_on and not last_attempt:
                    wait = retry_after_seconds(response.headers.get("Retry-After"))
                    elsewhere = self._alternative(tried)
                    honour = wait is not None and wait <= RETRY_AFTER_CAP
                    # A long Retry-After with nowhere else to go: the client gets the answer.
                    if wait is None or honour or elsewhere:
                        self._discard(response, ticket)
                        self.record.failures.append(f"http_{response.status}")
                        attempt += 1
                        if honour and not elsewhere:
                            await self._sleep(wait or 0.0)
                            waited = True
                        continue
                # Still nothing sent to the client: a stream's first event, or a whole JSON
                # body, is read here, so a backend failing before it can still be retried.
                head, complete = await prefetch(response, hop, self.deadline)
            except UpstreamError as exc:
                if response is not None:
                    response.close()
                self.backends.failed(ticket, route.circuit_breaker, exc.kind)
                self.backends.end(ticket)
                self.record.failures.append(exc.kind)
                if last_attempt or self._out_of_time():
                    raise
                attempt += 1
                continue
            except BaseException:
                # Cancelled (the client went away): the connection and the slot must not leak.
                if response is not None:
                    response.close()
                self.backends.end(ticket)
                raise
            if response.status >= 500:
                self.backends.failed(ticket, route.circuit_breaker, f"http_{response.status}")
                self.record.failures.append(f"http_{response.status}")
            return Sent(hop, response, ticket, head, complete, usage_added=ask_usage)

    def _choose(self, tried: set[str]) -> Target | None:
        """The policy's best backend that can take a request now, untried ones first."""
        now = time.monotonic()
        targets = self.route.targets
        if len(targets) == 1:  # nothing to order (a policy's order of one is that one)
            return targets[0] if self.backends.can_take(targets[0], now) else None
        ordered = self.policies.for_route(self.route).order(targets, self.backends)
        ready = [t for t in ordered if self.backends.can_take(t, now)]
        fresh = [t for t in ready if t.key not in tried]
        return (fresh or ready or [None])[0]

    def _alternative(self, tried: set[str]) -> bool:
        now = time.monotonic()
        return any(
            t.key not in tried and self.backends.can_take(t, now) for t in self.route.targets
        )

    async def _wait_for_a_slot(self, until: float) -> None:
        """Every backend is busy (maxConcurrent) or ejected: wait a bounded time, then 503."""
        now = time.monotonic()
        states = [self.backends.state(t) for t in self.route.targets]
        ejected = [s for s in states if s.health(now) != "healthy"]
        if len(ejected) == len(states):
            soonest = min(s.ejected_until for s in ejected) - now
            raise NoBackend(
                503,
                "no_healthy_backend",
                f"No healthy backend for model '{self.model}': every backend failed recently "
                f"and is resting ({', '.join(s.label for s in states)}).",
                max(1.0, soonest),
            )
        if now >= until or self._out_of_time():
            raise NoBackend(
                503,
                "backend_busy",
                f"Every backend for model '{self.model}' is at its maxConcurrent limit; "
                f"waited {self.route.queue_timeout:g} s.",
                1.0,
            )
        # Re-check at least twice a second: a wake-up may be missed between check and wait.
        await self.backends.wait_for_change(min(0.5, until - now))

    def _discard(self, response: aiohttp.ClientResponse, ticket: Ticket) -> None:
        if response.status >= 500:
            self.backends.failed(ticket, self.route.circuit_breaker, f"http_{response.status}")
        response.close()
        self.backends.end(ticket)

    async def _sleep(self, seconds: float) -> None:
        remaining = self.deadline.remaining_total()
        if remaining is not None:
            seconds = min(seconds, max(0.0, remaining))
        await asyncio.sleep(seconds)

    def _out_of_time(self) -> bool:
        remaining = self.deadline.remaining_total()
        return remaining is not None and remaining <= 0

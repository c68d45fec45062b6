"""The proxy flow, one request top to bottom: attempts at a route's backends until one answers
(selection, maxConcurrent slots, retries with backoff, all before a byte reaches the client),
that answer relayed, and the one place a backend gets its verdict and its slot back.

Read as Caddy's reverseproxy.go: `ProxiedRequest.serve` (ServeHTTP) -> `_attempt` (one
attempt: proxyLoopIteration) -> `_open` and `prefetch` (reverseProxy) -> `_relay`
(finalizeResponse) -> `_verdict`."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.backends import Backends, Ticket
from gateway.middleware import RequestRecord
from gateway.object_routes import ObjectRoute, ObjectRoutes
from gateway.redact import Redactor
from gateway.relay import (
    BackendAnswer,
    StreamCut,
    end_with_error,
    is_event_stream,
    is_json_like,
    relay,
    relay_continuation,
)
from gateway.request_body import RequestBody
from gateway.resume import StreamWatch, continued_body, exact_payload, request_refusal
from gateway.routing import Hop, Route, Target
from gateway.selection import Policies, Policy
from gateway.upstream import (
    BodyReader,
    Deadline,
    UpstreamError,
    forward_headers,
    open_response,
    upstream_url,
)
from wire.errors import APIError
from wire.sse import MAX_EVENT_BYTES, EventTooLarge, event_ended

if TYPE_CHECKING:
    from gateway.tracing import AttemptSpan

log = structlog.get_logger("gateway.proxy")

BACKOFF_BASE = 0.1  # seconds before the first retry of the same backend, doubling each time
BACKOFF_CAP = 2.0
# A Retry-After longer than this is not waited out: another backend is tried, or the
# backend's answer goes to the client.
RETRY_AFTER_CAP = 10.0
# Backends that refuse `stream_options` answer with one of these (Ollama, LM Studio, TGI,
# LocalAI).
_REFUSES_STREAM_OPTIONS = (400, 422)


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """What every attempt sends: the client's request as the handler parsed it."""

    method: str
    tail: str  # the raw path below the API root, checked
    raw_query: str
    headers: CIMultiDictProxy[str]
    body: RequestBody
    wants_usage: bool  # a stream that did not ask for usage: the gateway asks for it
    creates_objects: bool = False  # POST /responses: the answer names an object to remember


class NoBackend(Exception):
    """No backend could take the request; `status` and `retry_after` say what to answer."""

    def __init__(self, status: int, code: str, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class _Retry:
    """An attempt that did not answer the client: try again."""

    counted: bool = True  # against `retries` (a refused stream_options is not)
    wait: float | None = None  # a Retry-After to wait out first


@dataclass(slots=True)
class ProxiedRequest:
    """One client request's way through a route's backends."""

    session: aiohttp.ClientSession
    backends: Backends
    policies: Policies
    redactor: Redactor
    route: Route
    client: ClientRequest
    record: RequestRecord
    deadline: Deadline
    objects: ObjectRoutes | None = None
    tried: set[str] = field(default_factory=set)
    attempt_span: AttemptSpan | None = None  # the attempt's trace, when tracing is on
    _remembering: asyncio.Task[None] | None = None
    # Stream resume: backends a continuation may not go to, and the continuation's body.
    excluded: set[str] = field(default_factory=set)
    continued: dict[str, Any] | None = None
    refusal: str | None = None  # why this request's stream could not be resumed, if cut
    # The route's policy, once it has ordered the backends; and what it decided, for the
    # policies that remember where requests went (cache-aware).
    policy: Policy | None = None
    routing: Any = None

    # What a policy may know of the request (selection.RequestFacts).
    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self.client.headers

    @property
    def payload(self) -> dict[str, Any] | None:
        return self.client.body.payload

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """Attempts until a backend answers, then its answer to the client."""
        try:
            answer, ticket = await self._attempts()
        except UpstreamError as exc:
            self.record.error = exc.kind
            raise APIError.upstream(exc.status, exc.message, code=exc.kind) from None
        except NoBackend as exc:
            self.record.error = exc.code
            raise APIError.upstream(
                exc.status,
                exc.message,
                code=exc.code,
                retry_after=max(1, round(exc.retry_after)),
            ) from None
        return await self._relay(request, answer, ticket)

    async def _attempts(self) -> tuple[BackendAnswer, Ticket]:
        """The attempt loop: the policy's best backend that can take the request, retried
        with backoff (or after its Retry-After) while nothing has reached the client."""
        waited_until = time.monotonic() + self.route.queue_timeout
        attempt = 0
        waited = False  # a Retry-After was just waited out: no backoff on top
        while True:
            target = self._choose()
            if target is None:
                await self._wait_for_a_slot(waited_until)
                continue
            if target.key in self.tried and attempt and not waited:
                await self._sleep(backoff(attempt - 1))
            self.tried.add(target.key)
            outcome = await self._attempt(target, last=attempt >= self.route.retries)
            if not isinstance(outcome, _Retry):
                return outcome
            if outcome.counted:
                attempt += 1
            else:
                self.tried.discard(target.key)
            waited = outcome.wait is not None
            if waited:
                await self._sleep(outcome.wait or 0.0)

    async def _attempt(self, target: Target, last: bool) -> tuple[BackendAnswer, Ticket] | _Retry:
        """One attempt at one backend: its slot taken, the request sent, and what must
        arrive before the client is answered read ahead, so that a backend failing before
        it can still be retried."""
        ticket = self.backends.begin(target, time.monotonic())
        record = self.record
        if self.policy is not None:  # counted in first, so a burst sees it
            self.policy.chosen(target, self.backends, self)
            if self.routing is not None:
                record.routing = self.routing.reason
                record.matched_tokens = self.routing.matched_tokens
                self.backends.prefilling(ticket, self.routing.uncached(target))
        hop = self.route.hop(self.client.body.model, target)
        record.backend = hop.backend_label
        record.upstream_model = hop.upstream_model
        record.attempts += 1
        if record.span is not None:
            self.attempt_span = record.span.attempt(hop, record.attempts)
        # Ask for usage unless this backend is known to refuse stream_options.
        ask_usage = self.client.wants_usage and not ticket.state.refuses_stream_options
        response: aiohttp.ClientResponse | None = None
        try:
            response = await self._open(hop, ask_usage)
            retry = self._retry_instead(response, ticket, hop, ask_usage, last)
            if retry is not None:
                return retry
            head, complete = await prefetch(response, hop, self.deadline)
            self.backends.answered(ticket)
        except UpstreamError as exc:
            give_up = last or self._out_of_time()
            self._verdict(ticket, response, exc.kind, retry_reason=None if give_up else exc.kind)
            record.failures.append(exc.kind)
            if give_up:
                raise
            return _Retry()
        except BaseException:
            # Cancelled (the client went away): the connection and the slot must not leak.
            self._verdict(ticket, response, None)
            raise
        if response.status >= 500:
            record.failures.append(f"http_{response.status}")
        return BackendAnswer(hop, response, head, complete, usage_added=ask_usage), ticket

    async def _open(self, hop: Hop, ask_usage: bool) -> aiohttp.ClientResponse:
        """The request as this backend gets it, sent; its status line and headers back."""
        client = self.client
        headers = forward_headers(client.headers, hop, self.record.request_id)
        if client.body.payload is not None and "Content-Type" not in headers:
            headers["Content-Type"] = "application/json"
        if self.attempt_span is not None:
            self.attempt_span.inject(headers)  # traceparent: this attempt, in the client's trace
        url = upstream_url(hop, client.tail, client.raw_query)
        if self.continued is None:
            body = client.body.for_hop(hop, ask_usage)
        else:
            body = continued_body(self.continued, hop.upstream_model, ask_usage)
        return await open_response(
            self.session, hop, client.method, url, headers, body, self.deadline
        )

    def _retry_instead(
        self,
        response: aiohttp.ClientResponse,
        ticket: Ticket,
        hop: Hop,
        ask_usage: bool,
        last: bool,
    ) -> _Retry | None:
        """A response not to give the client (its backend freed), or None to give it."""
        status = response.status
        if ask_usage and status in _REFUSES_STREAM_OPTIONS:
            # Remember it, and send the request as the client wrote it.
            log.info("backend refuses stream_options", backend=hop.backend_label)
            ticket.state.refuses_stream_options = True
            failure = _http_failure(response)
            self._verdict(ticket, response, failure, retry_reason="refuses_stream_options")
            return _Retry(counted=False)
        if status not in self.route.retry_on or last:
            return None
        wait = retry_after_seconds(response.headers.get("Retry-After"))
        elsewhere = self._alternative()
        honour = wait is not None and wait <= RETRY_AFTER_CAP
        if not (wait is None or honour or elsewhere):
            return None  # a long Retry-After with nowhere else to go: the client gets it
        self._verdict(ticket, response, _http_failure(response), retry_reason=f"http_{status}")
        self.record.failures.append(f"http_{status}")
        return _Retry(wait=wait or 0.0) if honour and not elsewhere else _Retry()

    async def _relay(
        self, request: web.Request, answer: BackendAnswer, ticket: Ticket
    ) -> web.StreamResponse:
        """Past this point the client has an answer started: failures end it in-band, or,
        for a resumable stream, are carried on on another backend (see `_resume`)."""
        watch = self._watch()
        response: web.StreamResponse | None = None
        while True:
            try:
                return await self._relay_part(request, response, answer, ticket, watch)
            except StreamCut as cut:
                assert watch is not None  # only a watched stream is cut rather than ended
                response = cut.response
                resumed = await self._resume(cut, watch, answer.hop.target)
                if resumed is None:
                    return response
                answer, ticket = resumed

    async def _relay_part(
        self,
        request: web.Request,
        response: web.StreamResponse | None,
        answer: BackendAnswer,
        ticket: Ticket,
        watch: StreamWatch | None,
    ) -> web.StreamResponse:
        """One backend's answer relayed: the whole answer, or one part of a resumed stream."""
        record = self.record
        completed = False
        failure: str | None = None
        try:
            response = await self._send(request, response, answer, watch)
            completed = record.error is None
            if self._remembering is not None:
                # Shared (Redis) before the client can ask another gateway about it.
                await self._remembering
            return response
        except StreamCut as cut:
            failure = cut.error.kind
            raise
        finally:
            # The verdict comes when the answer is over: a stream that dies after its
            # headers is a failure, not a success.
            if failure is None and record.error != "client_disconnected":
                failure = record.error
            self._verdict(
                ticket, answer.response, failure or _http_failure(answer.response), completed
            )
            cut_off = record.streamed and record.error not in (None, "client_disconnected")
            if watch is None and self.refusal is not None and cut_off:
                record.resumes.append(("refused", self.refusal))

    async def _send(
        self,
        request: web.Request,
        response: web.StreamResponse | None,
        answer: BackendAnswer,
        watch: StreamWatch | None,
    ) -> web.StreamResponse:
        """The answer to the client, or a resumed stream's next part into its stream."""
        if response is not None:
            assert watch is not None
            await relay_continuation(response, answer, self.record, self.deadline, watch)
            return response
        on_created = None
        if self.client.creates_objects and self.objects is not None:
            on_created = self._created_by(answer.hop)
        return await relay(
            request, answer, self.record, self.deadline, self.redactor, on_created, watch
        )

    # -- stream resume ----------------------------------------------------------------------

    def _watch(self) -> StreamWatch | None:
        """A watch over the stream when it may be resumed if cut; else None (the plain path).
        A route with no backend that resumes has no refusals to count either."""
        route, client = self.route, self.client
        if not any(t.resume for t in route.targets):
            return None
        self.refusal = request_refusal(client.tail, client.body.payload)
        if self.refusal is not None:
            if self.refusal in ("endpoint", "not_a_stream"):
                self.refusal = None  # never a stream to cut
            return None
        return StreamWatch.of(client.tail, route.max_resumes)

    async def _resume(
        self, cut: StreamCut, watch: StreamWatch, died: Target
    ) -> tuple[BackendAnswer, Ticket] | None:
        """The stream's continuation from another backend, its first event in; or None,
        with the stream ended by the error event, when it is not resumed."""
        record = self.record
        watch.died.add(died.key)
        payload = exact_payload(self.client.body.raw)
        reason = watch.refusal(died.resume, self.deadline.remaining_total(), payload)
        if reason is None and not self._resume_candidates(watch):
            reason = "no_backend"
        if reason is not None:
            return await self._not_resumed(cut, "refused", reason)
        record.failures.append(cut.error.kind)  # ending the stream would count it there
        record.seams.append(
            {"backend": died.label, "completion_tokens": watch.so_far.completion_tokens}
        )
        self.continued = watch.next_part(payload)
        self.excluded = {t.key for t in self.route.targets if not t.resume} | watch.died
        self.tried = set()
        try:
            resumed = await self._attempts()
        except UpstreamError as exc:
            return await self._not_resumed(cut, "failed", exc.kind)
        except NoBackend:
            return await self._not_resumed(cut, "refused", "no_backend")
        if not is_event_stream(resumed[0].response):
            # Its answer is an error (or not a stream): no continuation from it.
            self._verdict(resumed[1], resumed[0].response, _http_failure(resumed[0].response))
            return await self._not_resumed(cut, "failed", f"http_{resumed[0].response.status}")
        record.resumes.append(("resumed", ""))
        log.info("stream resumed", backend=resumed[0].hop.backend_label, seam=watch.seams)
        return resumed

    def _resume_candidates(self, watch: StreamWatch) -> list[Target]:
        return [t for t in self.route.targets if t.resume and t.key not in watch.died]

    async def _not_resumed(self, cut: StreamCut, outcome: str, reason: str) -> None:
        self.record.resumes.append((outcome, reason))
        log.info("stream not resumed", outcome=outcome, reason=reason)
        # A failed continuation's cut was counted at its seam.
        await end_with_error(cut.response, self.record, cut.error, counted=outcome == "failed")
        return None

    def _created_by(self, hop: Hop) -> Callable[[str], None]:
        objects = self.objects
        assert objects is not None
        entry = ObjectRoute(hop.route.public_id, hop.public_id, hop.target.key, self.record.key)

        def created(object_id: str) -> None:
            # A task, started at once: a request naming it while the stream runs finds it.
            self._remembering = asyncio.ensure_future(objects.remember(object_id, entry))

        return created

    def _verdict(
        self,
        ticket: Ticket,
        response: aiohttp.ClientResponse | None,
        failure: str | None,
        completed: bool = False,
        retry_reason: str | None = None,
    ) -> None:
        """The one place a backend gets its verdict (a failure, a success, or none when the
        client went away) and its slot back, and the attempt's span its end. A body not read
        to its end (client gone, backend failed) closes the connection: that tells the
        backend to stop generating."""
        attempt = self.attempt_span
        if attempt is not None:
            self.attempt_span = None
            status = None if response is None else response.status
            attempt.end(status, failure, retry_reason, completed)
        if response is not None:
            if completed:
                response.release()
            else:
                response.close()
        if failure is not None:
            self.backends.failed(ticket, self.route.circuit_breaker, failure)
        elif completed:
            self.backends.succeeded(ticket)
        self.backends.end(ticket)

    # -- choosing a backend ----------------------------------------------------------------

    def _choose(self) -> Target | None:
        """The policy's best backend that can take a request now, untried ones first."""
        now = time.monotonic()
        targets = self._targets()
        backends = self.backends
        if len(targets) == 1:  # nothing to order (a policy's order of one is that one)
            return targets[0] if backends.can_take(targets[0], now) else None
        policy = self.policy = self.policies.for_route(self.route)
        ordered = policy.order(targets, backends, self)
        ready = [t for t in ordered if backends.can_take(t, now)]
        fresh = [t for t in ready if t.key not in self.tried]
        return (fresh or ready or [None])[0]

    def _alternative(self) -> bool:
        now = time.monotonic()
        return any(
            t.key not in self.tried and self.backends.can_take(t, now) for t in self._targets()
        )

    def _targets(self) -> tuple[Target, ...]:
        """The route's backends this attempt may go to (a continuation: not every one)."""
        if not self.excluded:
            return self.route.targets
        return tuple(t for t in self.route.targets if t.key not in self.excluded)

    async def _wait_for_a_slot(self, until: float) -> None:
        """Every backend is busy (maxConcurrent) or ejected: wait a bounded time, then 503."""
        now = time.monotonic()
        model = self.client.body.model
        states = [self.backends.state(t) for t in self._targets()]
        ejected = [s for s in states if s.health(now) != "healthy"]
        if len(ejected) == len(states):
            soonest = min(s.ejected_until for s in ejected) - now
            raise NoBackend(
                503,
                "no_healthy_backend",
                f"No healthy backend for model '{model}': every backend failed recently "
                f"and is resting ({', '.join(s.label for s in states)}).",
                max(1.0, soonest),
            )
        if now >= until or self._out_of_time():
            raise NoBackend(
                503,
                "backend_busy",
                f"Every backend for model '{model}' is at its maxConcurrent limit; "
                f"waited {self.route.queue_timeout:g} s.",
                1.0,
            )
        # Re-check at least twice a second: a wake-up may be missed between check and wait.
        await self.backends.wait_for_change(min(0.5, until - now))

    async def _sleep(self, seconds: float) -> None:
        remaining = self.deadline.remaining_total()
        if remaining is not None:
            seconds = min(seconds, max(0.0, remaining))
        await asyncio.sleep(seconds)

    def _out_of_time(self) -> bool:
        remaining = self.deadline.remaining_total()
        return remaining is not None and remaining <= 0


async def prefetch(
    response: aiohttp.ClientResponse, hop: Hop, deadline: Deadline
) -> tuple[bytes, bool]:
    """Read what must arrive before the client is answered: a stream's first whole event,
    or a whole JSON (or error) body. Other bodies (audio, images) are not read ahead."""
    reader = BodyReader(response, hop, deadline)
    if is_event_stream(response):
        return await _first_event(reader, hop)
    if is_json_like(response):
        body = bytearray()
        await reader.read_all(body)
        return bytes(body), True
    return b"", False


async def _first_event(reader: BodyReader, hop: Hop) -> tuple[bytes, bool]:
    head = bytearray()
    while chunk := await reader.read():
        # A blank line may straddle two reads: search from the last 3 bytes before this one.
        start = max(0, len(head) - 3)
        head += chunk
        if event_ended(head, start):
            return bytes(head), reader.at_eof()
        if len(head) > MAX_EVENT_BYTES:
            raise UpstreamError("event_too_large", 502, str(EventTooLarge(MAX_EVENT_BYTES)))
    if head.strip():
        raise UpstreamError(
            "died", 502, f"backend for model '{hop.public_id}' ended the stream inside an event"
        )
    return bytes(head), True


def _http_failure(response: aiohttp.ClientResponse) -> str | None:
    """A 5xx counts against the backend's health; any other status is an answer."""
    return f"http_{response.status}" if response.status >= 500 else None


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

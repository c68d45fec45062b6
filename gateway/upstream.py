"""Backends: the one pooled client session, the request sent to a backend, and its timeouts."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeVar

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.buffered_read import take_buffered
from gateway.config import Timeouts
from gateway.routing import Hop, Target

_T = TypeVar("_T")

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# The client's credentials belong to the gateway, never to a backend; the rest the gateway
# or aiohttp sets itself.
_NOT_FORWARDED_TO_BACKEND = HOP_BY_HOP | {
    "host",
    "authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "content-length",
    "accept-encoding",
    "x-request-id",
    "origin",
    "referer",
    # The gateway already holds the whole body; the backend has nothing to agree to.
    "expect",
    # aiohttp has decoded a compressed request body; the backend gets it plain.
    "content-encoding",
}
# aiohttp decompresses and re-frames the body; our own middlewares set the request id.
_NOT_RETURNED_TO_CLIENT = HOP_BY_HOP | {
    "content-length",
    "content-encoding",
    "date",
    "server",
    "x-request-id",
    "set-cookie",
}


class UpstreamError(Exception):
    """A backend failure; `kind` labels metrics, `status` is what the client gets before bytes."""

    def __init__(self, kind: str, status: int, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.message = message


def make_session() -> aiohttp.ClientSession:
    """The process's one client session: pooled keep-alive connections to every backend."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, keepalive_timeout=60)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=True,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def get_models(
    session: aiohttp.ClientSession, target: Target, path: str = "/models"
) -> tuple[int, Any]:
    """A backend's model list (`GET <url>/models`, or a health check's path): its status and
    its JSON (None when the body is not JSON). Raises aiohttp.ClientError or OSError when the
    backend cannot be reached; callers bound the wait with `asyncio.timeout`. The health
    checks and the wildcard routes' catalog both ask this way: never a completion, always
    with the backend's own headers."""
    url = f"{target.base_url}{path}"
    async with session.get(url, headers=target.own_headers(), allow_redirects=False) as response:
        body = await response.read()
        try:
            payload = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            payload = None
        return response.status, payload


def _connection_listed(headers: Mapping[str, str]) -> set[str]:
    listed = headers.get("connection", "")
    return {name.strip().lower() for name in listed.split(",") if name.strip()}


def _dropped(headers: Mapping[str, str], always: frozenset[str]) -> frozenset[str]:
    listed = _connection_listed(headers) if "connection" in headers else None
    return always | listed if listed else always


def forward_headers(client: CIMultiDictProxy[str], hop: Hop, request_id: str) -> CIMultiDict[str]:
    dropped = _dropped(client, _NOT_FORWARDED_TO_BACKEND)
    headers = CIMultiDict([(k, v) for k, v in client.items() if k.lower() not in dropped])
    headers.update(hop.target.own_header_items)
    headers["X-Request-ID"] = request_id
    return headers


def returned_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    dropped = _dropped(upstream, _NOT_RETURNED_TO_CLIENT)
    return CIMultiDict([(k, v) for k, v in upstream.items() if k.lower() not in dropped])


# A target remembers the URLs of this many paths (the API's routes, in practice).
_URLS_PER_TARGET = 32


def upstream_url(hop: Hop, raw_tail: str, raw_query: str) -> URL:
    """The backend URL for a client path below `/v1`, already checked by `checked_tail`."""
    if not raw_query:
        urls = hop.target.urls
        url = urls.get(raw_tail)
        if url is None:
            url = URL(f"{hop.base_url}/{raw_tail}", encoded=True)
            if len(urls) < _URLS_PER_TARGET:
                urls[raw_tail] = url
        return url
    return URL(f"{hop.base_url}/{raw_tail}?{raw_query}", encoded=True)


class Deadline:
    """The per-request clock: idle gaps between reads, and an optional total budget.

    One watchdog per request enforces them, instead of an `asyncio.timeout()` per read: each
    guarded wait only moves the expiry (`_when`), and the one timer handle, when it fires
    early, re-arms itself at the current expiry. A timer-heap insert and removal per read,
    and the context manager around it, were a tenth of the gateway's CPU per request."""

    __slots__ = (
        "_cancelling",
        "_ends",
        "_expired",
        "_handle",
        "_handle_at",
        "_task",
        "_when",
        "started",
        "timeouts",
    )

    def __init__(self, timeouts: Timeouts, started: float) -> None:
        self.timeouts = timeouts
        self.started = started
        self._ends = None if timeouts.total is None else started + timeouts.total
        self._when: float | None = None  # the guarded wait's expiry; None between waits
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = 0.0
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._expired = False

    def remaining_total(self) -> float | None:
        if self._ends is None:
            return None
        return self._ends - time.monotonic()

    def limit(self, step: float | None) -> float | None:
        total = self.remaining_total()
        if total is None:
            return step
        return max(0.0, total if step is None else min(step, total))

    def arm(self, step: float | None) -> bool:
        """Guard the wait that follows for `step` seconds (and the total budget); False if
        neither applies. `disarm` must follow, whatever the wait's outcome."""
        ends = self._ends
        if step is None and ends is None:
            return False
        now = time.monotonic()
        when = now + step if step is not None else ends
        if ends is not None and ends < when:  # type: ignore[operator]
            when = ends
        self._when = when
        task = self._task
        if task is None:
            task = self._task = asyncio.current_task()
        assert task is not None
        self._cancelling = task.cancelling()
        handle = self._handle
        if handle is None or self._handle_at > when:  # type: ignore[operator]
            if handle is not None:
                handle.cancel()
            self._handle_at = when
            self._handle = asyncio.get_running_loop().call_later(when - now, self._fire)  # type: ignore[operator]
        return True

    def disarm(self) -> None:
        self._when = None

    def _fire(self) -> None:
        when = self._when
        if when is None:  # between waits: the next one arms a handle again
            self._handle = None
            return
        now = time.monotonic()
        if now < when:  # the expiry moved on since this handle was set
            self._handle_at = when
            self._handle = asyncio.get_running_loop().call_later(when - now, self._fire)
            return
        self._handle = None
        self._when = None
        self._expired = True
        assert self._task is not None
        self._task.cancel()

    def timed_out(self) -> bool:
        """After a CancelledError in a guarded wait: True if it was this watchdog's doing
        (and not also the client going away), as `asyncio.timeout` decides it."""
        if not self._expired:
            return False
        self._expired = False
        assert self._task is not None
        return self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        """The request is over: drop the timer."""
        self._when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


@functools.lru_cache(maxsize=64)
def _connect_timeout(connect: float | None) -> aiohttp.ClientTimeout:
    """The client timeout for a connect limit (an immutable value, made once per limit)."""
    return aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect)


async def open_response(
    session: aiohttp.ClientSession,
    hop: Hop,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    body: bytes,
    deadline: Deadline,
) -> aiohttp.ClientResponse:
    """Send the request and wait for the backend's status line and headers."""
    timeouts = hop.timeouts
    first_byte = deadline.limit(timeouts.first_byte)
    client_timeout = _connect_timeout(timeouts.connect)
    guarded = deadline.arm(timeouts.first_byte)
    try:
        return await session.request(
            method,
            url,
            data=body if body else None,
            headers=headers,
            timeout=client_timeout,
            allow_redirects=False,
            # A discovered address is dialled by IP; TLS still names (and verifies) the host.
            server_hostname=hop.target.server_name,
        )
    except asyncio.CancelledError:
        if guarded and deadline.timed_out():
            raise UpstreamError(
                "timeout_first_byte",
                504,
                f"backend for model '{hop.public_id}' sent no response within {first_byte:g} s",
            ) from None
        raise
    # Before TimeoutError: aiohttp's connect timeout is a subclass of it.
    except aiohttp.ConnectionTimeoutError:
        raise UpstreamError(
            "timeout_connect",
            504,
            f"backend for model '{hop.public_id}' ({hop.backend_label}) did not accept a "
            f"connection within {timeouts.connect:g} s",
        ) from None
    except TimeoutError:
        raise UpstreamError(
            "timeout_first_byte",
            504,
            f"backend for model '{hop.public_id}' sent no response within {first_byte:g} s",
        ) from None
    except aiohttp.ClientConnectorError as exc:
        reason = (
            exc.os_error.strerror if exc.os_error and exc.os_error.strerror else "cannot connect"
        )
        raise UpstreamError(
            "refused",
            502,
            f"backend for model '{hop.public_id}' ({hop.backend_label}) is unreachable: {reason}",
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamError(
            "bad_response",
            502,
            f"backend for model '{hop.public_id}' ({hop.backend_label}) failed before "
            f"responding: {exc.__class__.__name__}",
        ) from None
    finally:
        if guarded:
            deadline.disarm()


class BodyReader:
    """The body as it arrives, one read at a time, failing with UpstreamError on idle gaps,
    total time or death. A plain coroutine per read: cheaper than an async generator, and
    a stream's relay makes one read per event or so."""

    __slots__ = ("_hop", "content", "deadline", "idle")

    def __init__(self, response: aiohttp.ClientResponse, hop: Hop, deadline: Deadline) -> None:
        self.content = response.content
        self._hop = hop
        self.deadline = deadline
        self.idle = hop.timeouts.idle

    def at_eof(self) -> bool:
        """Everything is read: the next `read` would return b""."""
        return self.content.at_eof()

    async def read(self) -> bytes:
        """The next bytes, as soon as there are any; b"" at the end of the body."""
        deadline = self.deadline
        guarded = deadline.arm(self.idle)
        try:
            return take_buffered(self.content) or await self.content.readany()
        except (asyncio.CancelledError, aiohttp.ClientError, OSError) as exc:
            error = self.failure(exc, guarded)
            if error is None:
                raise
            raise error from None
        finally:
            if guarded:
                deadline.disarm()

    def failure(self, exc: BaseException, guarded: bool) -> UpstreamError | None:
        """What a failed read (`deadline.arm(self.idle)` returned `guarded`) raises: an
        UpstreamError, or None for `exc` itself (a cancellation that is not the watchdog's).
        The relay's event loop reads inline, with the same `failure`."""
        hop = self._hop
        if isinstance(exc, asyncio.CancelledError):
            if not (guarded and self.deadline.timed_out()):
                return None
            total = self.deadline.remaining_total()
            if total is not None and total <= 0:
                return UpstreamError(
                    "timeout_total",
                    504,
                    f"backend for model '{hop.public_id}' exceeded the total timeout "
                    f"of {hop.timeouts.total:g} s",
                )
            return UpstreamError(
                "timeout_idle",
                504,
                f"backend for model '{hop.public_id}' sent nothing for {self.idle:g} s",
            )
        return UpstreamError(
            "died",
            502,
            f"backend for model '{hop.public_id}' ({hop.backend_label}) closed the connection "
            f"before the response was complete ({exc.__class__.__name__})",
        )

    async def wait(self, woken: asyncio.Future[_T]) -> _T:
        """Wait for `woken` as `read` waits for bytes, under the same clock and with the same
        errors: for a relay that reads the body without `read` (gateway.transport_relay),
        whose `woken` is set when there is something to do or fails as the body would."""
        deadline = self.deadline
        guarded = deadline.arm(self.idle)
        try:
            return await woken
        except (asyncio.CancelledError, aiohttp.ClientError, OSError) as exc:
            error = self.failure(exc, guarded)
            if error is None:
                raise
            raise error from None
        finally:
            if guarded:
                deadline.disarm()

    def heard(self) -> None:
        """Bytes arrived outside `read` or `wait`: the idle clock of the wait starts again."""
        if self.idle is not None:
            self.deadline.arm(self.idle)

    async def read_all(self, into: bytearray) -> None:
        """Append the rest of the body to `into`."""
        while chunk := await self.read():
            into += chunk


async def read_chunks(
    response: aiohttp.ClientResponse, hop: Hop, deadline: Deadline
) -> AsyncIterator[bytes]:
    """The body as it arrives (see BodyReader)."""
    reader = BodyReader(response, hop, deadline)
    while chunk := await reader.read():
        yield chunk

"""Per-key rate limits (requests and tokens per minute, concurrency): the rules, OpenAI's
headers, and the windows of this process.

Sliding one-minute windows; tokens are counted from each response's `usage` when it ends,
so a request is refused when the minute's tokens are already spent. gateway/redis_limits.py
keeps the same windows in Redis for several processes; gateway/admission.py picks the store."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from gateway.client_keys import Caller
from wire.errors import APIError

WINDOW = 60.0


@dataclass(frozen=True, slots=True)
class Standing:
    """Where a key stands in its windows, for OpenAI's x-ratelimit-* headers."""

    requests: int = 0
    tokens: int = 0
    requests_reset: float | None = None  # seconds until the oldest request leaves the window
    tokens_reset: float | None = None


def limited(caller: Caller) -> bool:
    return caller.rpm is not None or caller.tpm is not None or caller.max_concurrent is not None


def headers(caller: Caller, standing: Standing) -> dict[str, str]:
    out: dict[str, str] = {}
    if caller.rpm is not None:
        out["x-ratelimit-limit-requests"] = str(caller.rpm)
        out["x-ratelimit-remaining-requests"] = str(max(0, caller.rpm - standing.requests))
        if standing.requests_reset is not None:
            out["x-ratelimit-reset-requests"] = _seconds(standing.requests_reset)
    if caller.tpm is not None:
        out["x-ratelimit-limit-tokens"] = str(caller.tpm)
        out["x-ratelimit-remaining-tokens"] = str(max(0, caller.tpm - standing.tokens))
        if standing.tokens_reset is not None:
            out["x-ratelimit-reset-tokens"] = _seconds(standing.tokens_reset)
    return out


def refusal(caller: Caller, standing: Standing, what: str, wait: float) -> APIError:
    retry = max(1, math.ceil(wait))
    return APIError.rate_limited(
        f"Rate limit reached for key '{caller.name}' on {what}. Please try again in {retry}s.",
        retry_after=retry,
        headers=headers(caller, standing),
    )


def check(caller: Caller, standing: Standing, in_flight: int) -> APIError | None:
    """The refusal for a key whose windows are full, or None when it may go on."""
    if caller.rpm is not None and standing.requests >= caller.rpm:
        what = f"requests per minute (RPM): limit {caller.rpm}"
        return refusal(caller, standing, what, standing.requests_reset or WINDOW)
    if caller.tpm is not None and standing.tokens >= caller.tpm:
        what = f"tokens per minute (TPM): limit {caller.tpm}"
        return refusal(caller, standing, what, standing.tokens_reset or WINDOW)
    if caller.max_concurrent is not None and in_flight >= caller.max_concurrent:
        what = f"concurrent requests: limit {caller.max_concurrent}"
        return refusal(caller, standing, what, 1.0)
    return None


@dataclass
class _Usage:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0
    in_flight: int = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW:
            self.token_sum -= self.tokens.popleft()[1]

    def standing(self, now: float) -> Standing:
        return Standing(
            requests=len(self.requests),
            tokens=self.token_sum,
            requests_reset=self.requests[0] + WINDOW - now if self.requests else None,
            tokens_reset=self.tokens[0][0] + WINDOW - now if self.tokens else None,
        )


class LocalWindows:
    """The windows of this process only."""

    def __init__(self) -> None:
        self._usage: dict[str, _Usage] = {}

    def _of(self, caller: Caller, now: float) -> _Usage:
        usage = self._usage.setdefault(caller.name, _Usage())
        usage.expire(now)
        return usage

    def admit(self, caller: Caller) -> dict[str, str]:
        """Count a request in, or raise 429 with OpenAI's headers; returns the headers to send."""
        now = time.monotonic()
        usage = self._of(caller, now)
        refused = check(caller, usage.standing(now), usage.in_flight)
        if refused is not None:
            raise refused
        usage.requests.append(now)
        usage.in_flight += 1
        return headers(caller, usage.standing(now))

    def release(self, caller: Caller, tokens: int) -> None:
        now = time.monotonic()
        usage = self._of(caller, now)
        usage.in_flight -= 1
        if tokens:
            usage.tokens.append((now, tokens))
            usage.token_sum += tokens


def _seconds(value: float) -> str:
    return f"{max(0.0, value):.3g}s"

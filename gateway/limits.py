"""Per-key rate limits (requests and tokens per minute, concurrency), in this process.

Sliding one-minute windows; tokens are counted from each response's `usage` when it ends,
so a request is refused when the minute's tokens are already spent."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from gateway.access import Caller
from wire.errors import RATE_LIMIT, APIError

WINDOW = 60.0


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


class Limiter:
    def __init__(self) -> None:
        self._usage: dict[str, _Usage] = {}

    def _of(self, caller: Caller, now: float) -> _Usage:
        usage = self._usage.setdefault(caller.name, _Usage())
        usage.expire(now)
        return usage

    async def admit(self, caller: Caller) -> dict[str, str]:
        """Count a request in, or raise 429 with OpenAI's headers; returns the headers to send."""
        now = time.monotonic()
        usage = self._of(caller, now)
        if caller.rpm is not None and len(usage.requests) >= caller.rpm:
            wait = usage.requests[0] + WINDOW - now
            self._refuse(caller, usage, now, f"requests per minute (RPM): limit {caller.rpm}", wait)
        if caller.tpm is not None and usage.token_sum >= caller.tpm:
            wait = usage.tokens[0][0] + WINDOW - now if usage.tokens else WINDOW
            self._refuse(caller, usage, now, f"tokens per minute (TPM): limit {caller.tpm}", wait)
        if caller.max_concurrent is not None and usage.in_flight >= caller.max_concurrent:
            self._refuse(
                caller, usage, now, f"concurrent requests: limit {caller.max_concurrent}", 1.0
            )
        usage.requests.append(now)
        usage.in_flight += 1
        return self.headers(caller, usage, now)

    def release(self, caller: Caller, tokens: int) -> None:
        now = time.monotonic()
        usage = self._of(caller, now)
        usage.in_flight -= 1
        if tokens:
            usage.tokens.append((now, tokens))
            usage.token_sum += tokens

    def headers(self, caller: Caller, usage: _Usage, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        if caller.rpm is not None:
            headers["x-ratelimit-limit-requests"] = str(caller.rpm)
            headers["x-ratelimit-remaining-requests"] = str(
                max(0, caller.rpm - len(usage.requests))
            )
            if usage.requests:
                headers["x-ratelimit-reset-requests"] = _seconds(usage.requests[0] + WINDOW - now)
        if caller.tpm is not None:
            headers["x-ratelimit-limit-tokens"] = str(caller.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, caller.tpm - usage.token_sum))
            if usage.tokens:
                headers["x-ratelimit-reset-tokens"] = _seconds(usage.tokens[0][0] + WINDOW - now)
        return headers

    def _refuse(self, caller: Caller, usage: _Usage, now: float, what: str, wait: float) -> None:
        retry = max(1, math.ceil(wait))
        raise APIError(
            429,
            f"Rate limit reached for key '{caller.name}' on {what}. Please try again in {retry}s.",
            RATE_LIMIT,
            None,
            "rate_limit_exceeded",
            headers={"Retry-After": str(retry), **self.headers(caller, usage, now)},
        )


def _seconds(value: float) -> str:
    return f"{max(0.0, value):.3g}s"

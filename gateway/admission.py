"""What the request path calls: admit a keyed request before it is forwarded, release it when
its answer ended. The windows are this process's own, or Redis's when `redisUrl` is set."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.client_keys import Caller
from gateway.rate_limits import WINDOW, LocalWindows, check, headers, limited, refusal
from gateway.redis_limits import RedisUnavailable, RedisWindows
from wire.errors import APIError


@dataclass(frozen=True, slots=True)
class Admission:
    """A request let in: the headers to send, and the store that counted it (None: this
    process), so it is released there even if Redis went away meanwhile."""

    caller: Caller
    headers: dict[str, str]
    store: RedisWindows | None = None
    lease: str = ""


class AdmissionControl:
    """Admits keyed requests against their limits, in this process or in Redis."""

    def __init__(
        self,
        on_redis_state: Callable[[bool], None] | None = None,
        on_redis_error: Callable[[], None] | None = None,
    ) -> None:
        self.local = LocalWindows()
        self.redis: RedisWindows | None = None
        self.fail_open = True
        self._on_redis_state = on_redis_state
        self._on_redis_error = on_redis_error
        # This process's usage per key name and model: [requests, prompt, completion].
        self._usage: defaultdict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])

    def configure(self, redis_url: str | None, fail_open: bool) -> RedisWindows | None:
        """On start and after each reload. Returns the store that was replaced (to close)."""
        self.fail_open = fail_open
        if redis_url == (self.redis.url if self.redis else None):
            return None
        replaced = self.redis
        self.redis = None
        if redis_url:
            self.redis = RedisWindows(
                redis_url, WINDOW, on_state=self._on_redis_state, on_error=self._on_redis_error
            )
            if self._on_redis_state is not None:
                self._on_redis_state(True)  # until a call says otherwise
        return replaced

    async def admit(self, caller: Caller) -> Admission:
        """Count a request in, or raise 429 with OpenAI's headers (503 when Redis is out and
        the config says not to serve without it)."""
        redis = self.redis
        if redis is None:
            return Admission(caller, self.local.admit(caller) if limited(caller) else {})
        if redis.up:
            try:
                standing, busy, refused, lease = await redis.admit(caller)
            except RedisUnavailable:
                pass  # logged and counted by RedisWindows; served below as in any outage
            else:
                if refused:
                    raise check(caller, standing, busy) or refusal(
                        caller, standing, "its limits", WINDOW
                    )
                return Admission(caller, headers(caller, standing), redis, lease)
        if not self.fail_open:
            raise APIError.unavailable(
                "Rate limits are kept in Redis, which cannot be reached right now, and the "
                "gateway is configured not to serve without them (redisFailOpen: false).",
                code="rate_limiter_unavailable",
                retry_after=1,
            )
        # Fail-open: this process's own windows still hold each key to its limits here.
        return Admission(caller, self.local.admit(caller) if limited(caller) else {})

    def release(
        self, admission: Admission, model: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """When the answer ended (or failed): frees the slot and counts the tokens."""
        caller = admission.caller
        row = self._usage[caller.name, model]
        row[0] += 1
        row[1] += prompt_tokens
        row[2] += completion_tokens
        if admission.store is not None:
            admission.store.release(
                caller, admission.lease, model, prompt_tokens, completion_tokens
            )
        elif limited(caller):
            self.local.release(caller, prompt_tokens + completion_tokens)

    async def usage(self, names: list[str]) -> dict[str, Any]:
        """Usage per key and model: every gateway's when Redis is shared, else this process's."""
        if self.redis is not None and self.redis.up:
            try:
                return {"scope": "redis", "keys": await self.redis.usage(names)}
            except RedisUnavailable:
                pass
        keys: dict[str, dict[str, dict[str, int]]] = {}
        for (name, model), (requests, prompt, completion) in sorted(self._usage.items()):
            keys.setdefault(name, {})[model] = {
                "requests": requests,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
            }
        return {"scope": "process", "keys": keys}

    def status(self) -> dict[str, Any]:
        if self.redis is None:
            return {"store": "process"}
        return {
            "store": "redis",
            "redis": "up" if self.redis.up else "down",
            "failOpen": self.fail_open,
        }

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()

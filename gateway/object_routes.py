"""Where objects created through the gateway live: a Responses API id -> its route and backend.

`GET /v1/responses/{id}` and its kin name an object, not a model, so the gateway remembers
which backend created each response (from the body's or the stream's `id`) and sends those
requests there. Bounded (least recently used first out) and with a TTL; with `redisUrl` the
entries are also kept in Redis, so every gateway sharing it can route them."""

from __future__ import annotations

import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.redis_limits import TIMEOUT

log = structlog.get_logger("gateway.objects")

CAPACITY = 100_000  # ids remembered by one process
TTL = 30 * 24 * 3600.0  # seconds: OpenAI keeps a stored response 30 days
_PREFIX = "gateway:object:"


@dataclass(frozen=True, slots=True)
class ObjectRoute:
    """Who made an object, and where: enough to send a request naming it to that backend."""

    route_id: str  # the configured route's public id (`ollama/*` for a wildcard)
    model: str  # the model the client named when it created the object
    target: str  # Target.key of the backend that created it
    key: str | None  # the client key's name that created it (None without client keys)


class ObjectRoutes:
    """This process's entries, in front of Redis's when one is configured."""

    def __init__(
        self,
        capacity: int = CAPACITY,
        ttl: float = TTL,
        on_redis_error: Callable[[], None] | None = None,
    ) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._local: OrderedDict[str, tuple[float, ObjectRoute]] = OrderedDict()
        self._on_redis_error = on_redis_error or (lambda: None)
        self._redis: aioredis.Redis | None = None
        self._redis_url: str | None = None

    def configure(self, redis_url: str | None) -> aioredis.Redis | None:
        """On start and after each reload. Returns the client that was replaced (to close)."""
        if redis_url == self._redis_url:
            return None
        replaced = self._redis
        self._redis_url = redis_url
        self._redis = None
        if redis_url:
            # As for the limits: no retries inside redis-py, a short timeout, then local only.
            self._redis = aioredis.Redis.from_url(
                redis_url,
                socket_timeout=TIMEOUT,
                socket_connect_timeout=TIMEOUT,
                retry=Retry(NoBackoff(), 0),
            )
        return replaced

    async def remember(self, object_id: str, entry: ObjectRoute) -> None:
        """Kept here at once, and in Redis (when configured) before this returns."""
        self._keep(object_id, entry)
        redis = self._redis
        if redis is None:
            return
        try:
            await redis.set(_PREFIX + object_id, json.dumps(asdict(entry)), ex=int(self.ttl))
        except RedisError as exc:
            self._lost(exc)

    async def recall(self, object_id: str) -> ObjectRoute | None:
        found = self._local.get(object_id)
        if found is not None:
            expires, entry = found
            if expires > time.monotonic():
                self._local.move_to_end(object_id)
                return entry
            del self._local[object_id]
        redis = self._redis
        if redis is None:
            return None
        try:
            raw = await redis.get(_PREFIX + object_id)
        except RedisError as exc:
            self._lost(exc)
            return None
        if raw is None:
            return None
        try:
            entry = ObjectRoute(**json.loads(raw))
        except (TypeError, ValueError):
            return None
        self._keep(object_id, entry)
        return entry

    async def forget(self, object_id: str) -> None:
        self._local.pop(object_id, None)
        if self._redis is not None:
            try:
                await self._redis.delete(_PREFIX + object_id)
            except RedisError as exc:
                self._lost(exc)

    def _keep(self, object_id: str, entry: ObjectRoute) -> None:
        local = self._local
        local[object_id] = (time.monotonic() + self.ttl, entry)
        local.move_to_end(object_id)
        while len(local) > self.capacity:
            local.popitem(last=False)

    def _lost(self, exc: RedisError) -> None:
        self._on_redis_error()
        log.warning("redis unreachable for object routes", error=type(exc).__name__)

    async def close(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(RedisError):
                await self._redis.aclose()


async def close_client(client: aioredis.Redis) -> None:
    """A client a reload replaced, closed in the background."""
    with contextlib.suppress(RedisError):
        await client.aclose()

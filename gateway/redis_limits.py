"""Rate-limit windows, concurrency leases and usage counters in Redis, shared by every
gateway process and machine that names the same `redisUrl`.

Each decision is one Lua script, so it is atomic however many gateways ask at once, and the
clock is Redis's own (`TIME`), so machines with skewed clocks still agree. Per key name:
- `<prefix>{name}:requests`: sorted set of request ids scored by time (the RPM window);
- `<prefix>{name}:tokens`: hash of epoch second -> tokens counted then (the TPM window);
- `<prefix>{name}:leases`: sorted set of in-flight requests scored by when their lease
  expires. The process that holds a lease renews it; a process that dies without releasing
  loses its leases after LEASE_TTL instead of holding the slots forever;
- `<prefix>{name}:usage`: hash of `model|requests`, `model|prompt_tokens`,
  `model|completion_tokens` totals.
The `{name}` braces are a Redis Cluster hash tag: one key's data stays on one shard."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from gateway.client_keys import Caller
from gateway.rate_limits import Standing, limited

log = structlog.get_logger("gateway.redis")

LEASE_TTL = 60.0
# A request waits at most this long on Redis; past it the request is served as in an outage.
TIMEOUT = 0.5
PROBE_INTERVAL = 1.0

_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm, tpm, most = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local window, lease_ttl = tonumber(ARGV[4]), tonumber(ARGV[7])
local requests, oldest_request = 0, nil
if rpm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  requests = redis.call('ZCARD', KEYS[1])
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if first[2] then oldest_request = tonumber(first[2]) end
end
local tokens, oldest_second = 0, nil
if tpm >= 0 then
  local buckets = redis.call('HGETALL', KEYS[2])
  for i = 1, #buckets, 2 do
    local second = tonumber(buckets[i])
    if second + window <= now then
      redis.call('HDEL', KEYS[2], buckets[i])
    else
      tokens = tokens + tonumber(buckets[i + 1])
      if oldest_second == nil or second < oldest_second then oldest_second = second end
    end
  end
end
local busy = 0
if most >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  busy = redis.call('ZCARD', KEYS[3])
end
local refused = 0
if (rpm >= 0 and requests >= rpm) or (tpm >= 0 and tokens >= tpm)
    or (most >= 0 and busy >= most) then
  refused = 1
else
  if rpm >= 0 then
    redis.call('ZADD', KEYS[1], now, ARGV[5])
    redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
    requests = requests + 1
    if oldest_request == nil then oldest_request = now end
  end
  if most >= 0 then
    redis.call('ZADD', KEYS[3], now + lease_ttl, ARGV[6])
    redis.call('PEXPIRE', KEYS[3], math.ceil(lease_ttl * 1000) + 1000)
  end
end
local request_reset, token_reset = -1, -1
if oldest_request then request_reset = oldest_request + window - now end
if oldest_second then token_reset = oldest_second + window - now end
return {refused, requests, tokens, busy, tostring(request_reset), tostring(token_reset)}
"""

_RELEASE = """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local tokens = tonumber(ARGV[2]) + tonumber(ARGV[3])
if tokens > 0 then
  local second = redis.call('TIME')[1]
  redis.call('HINCRBY', KEYS[2], second, tokens)
  redis.call('EXPIRE', KEYS[2], math.ceil(tonumber(ARGV[4])) + 2)
end
redis.call('HINCRBY', KEYS[3], ARGV[5] .. '|requests', 1)
redis.call('HINCRBY', KEYS[3], ARGV[5] .. '|prompt_tokens', ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[5] .. '|completion_tokens', ARGV[3])
return 1
"""

_RENEW = """
local t = redis.call('TIME')
local expires = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expires, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
return 1
"""


# A script call waiting for its pipeline: (script name, keys, args, its answer).
_Call = tuple[str, list[str], list[Any], "asyncio.Future[Any]"]


class RedisUnavailable(Exception):
    """Redis did not answer; the caller decides between fail-open and 503."""


class _Batcher:
    """Script calls go to Redis as pipelines: the calls made while one pipeline is on its way
    are sent together as the next one, in one write and one read (what ioredis calls
    auto-pipelining). Under load most of the cost of a Redis call is that round trip, and one
    pipeline at a time keeps to one connection however many requests wait; a lone call waits
    one loop turn more."""

    def __init__(self, client: aioredis.Redis, scripts: dict[str, str]) -> None:
        self._client = client
        self._scripts = scripts
        self._sha = {
            name: hashlib.sha1(body.encode()).hexdigest() for name, body in scripts.items()
        }
        self._queue: list[_Call] = []
        self._sending: asyncio.Task[None] | None = None

    def call(self, script: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, keys, args, future))
        if len(self._queue) == 1 and self._sending is None:
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        if self._sending is not None or not self._queue:
            return
        batch, self._queue = self._queue, []
        self._sending = asyncio.create_task(self._send(batch))
        self._sending.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending = None
        self._flush()

    async def _send(self, batch: list[_Call]) -> None:
        try:
            results = await self._execute(batch)
            # After a Redis restart its script cache is empty: load, and rerun only those.
            missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
            if missing:
                for body in self._scripts.values():
                    await self._client.script_load(body)
                rerun = await self._execute([batch[i] for i in missing])
                for i, result in zip(missing, rerun, strict=True):
                    results[i] = result
        except RedisError as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for script, keys, args, _ in batch:
                pipe.execute_command("EVALSHA", self._sha[script], len(keys), *keys, *args)
            return await pipe.execute(raise_on_error=False)

    async def drain(self, within: float) -> None:
        """Waits (up to `within` seconds) until every queued call has been answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self._sending is not None and loop.time() < deadline:
            await asyncio.wait([self._sending], timeout=deadline - loop.time())
            await asyncio.sleep(0)  # the done callback sends what queued meanwhile


class RedisWindows:
    def __init__(
        self,
        url: str,
        window: float,
        *,
        on_state: Callable[[bool], None] | None = None,
        on_error: Callable[[], None] | None = None,
        lease_ttl: float = LEASE_TTL,
        prefix: str = "gateway:",
    ) -> None:
        self.url = url
        self.window = window
        self.lease_ttl = lease_ttl
        self.prefix = prefix
        self.up = True
        self._on_state = on_state or (lambda up: None)
        self._on_error = on_error or (lambda: None)
        # No retries inside redis-py: a request must not wait out a backoff on a dead Redis.
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self._scripts = _Batcher(
            self._client, {"admit": _ADMIT, "release": _RELEASE, "renew": _RENEW}
        )
        self._leases: dict[str, str] = {}  # lease id -> key name, renewed while in flight
        self._renewer: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None

    def _key(self, name: str, part: str) -> str:
        return f"{self.prefix}{{{name}}}:{part}"

    async def admit(self, caller: Caller) -> tuple[Standing, int, bool, str]:
        """(standing, requests in flight, refused, lease id). Raises RedisUnavailable."""
        if not limited(caller):
            return Standing(), 0, False, ""
        lease = uuid.uuid4().hex if caller.max_concurrent is not None else ""
        keys = [self._key(caller.name, part) for part in ("requests", "tokens", "leases")]
        args = [
            _or_none(caller.rpm),
            _or_none(caller.tpm),
            _or_none(caller.max_concurrent),
            self.window,
            uuid.uuid4().hex,
            lease,
            self.lease_ttl,
        ]
        try:
            refused, requests, tokens, busy, request_reset, token_reset = await self._scripts.call(
                "admit", keys, args
            )
        except RedisError as exc:
            self._lost(exc)
            raise RedisUnavailable from exc
        standing = Standing(
            requests=int(requests),
            tokens=int(tokens),
            requests_reset=_reset(request_reset),
            tokens_reset=_reset(token_reset),
        )
        if refused or not lease:
            return standing, int(busy), bool(refused), ""
        self._leases[lease] = caller.name
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_leases())
        return standing, int(busy) + 1, False, lease

    def release(
        self, caller: Caller, lease: str, model: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Never blocks the response: the update goes out in the background."""
        self._leases.pop(lease, None)
        keys = [self._key(caller.name, part) for part in ("leases", "tokens", "usage")]
        args = [lease, prompt_tokens, completion_tokens, self.window, model]
        self._scripts.call("release", keys, args).add_done_callback(self._released)

    def _released(self, done: asyncio.Future[Any]) -> None:
        exc = done.exception()
        if isinstance(exc, RedisError):
            # The lease expires on its own; these tokens go uncounted, which fail-open accepts.
            self._lost(exc)

    async def usage(self, names: list[str]) -> dict[str, dict[str, dict[str, int]]]:
        """Totals per key name and model, summed over every gateway sharing this Redis."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self._key(name, "usage"))
                rows = await pipe.execute()
        except RedisError as exc:
            self._lost(exc)
            raise RedisUnavailable from exc
        totals: dict[str, dict[str, dict[str, int]]] = {}
        for name, row in zip(names, rows, strict=True):
            for field, value in row.items():
                model, _, kind = field.decode().rpartition("|")
                totals.setdefault(name, {}).setdefault(model, {})[kind] = int(value)
        return totals

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            by_name: dict[str, list[str]] = {}
            for lease, name in list(self._leases.items()):
                by_name.setdefault(name, []).append(lease)
            if not by_name:
                continue
            try:
                for name, leases in by_name.items():
                    keys = [self._key(name, "leases")]
                    await self._scripts.call("renew", keys, [self.lease_ttl, *leases])
            except RedisError as exc:
                self._lost(exc)

    def _lost(self, exc: BaseException) -> None:
        self._on_error()
        if not self.up:
            return
        self.up = False
        self._on_state(False)
        log.warning("redis unreachable", error=type(exc).__name__, detail=str(exc)[:200])
        self._probe = asyncio.create_task(self._wait_for_redis())

    async def _wait_for_redis(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await self._client.ping()
            except RedisError:
                continue
            self.up = True
            self._on_state(True)
            log.info("redis reachable again")
            return

    async def close(self) -> None:
        """Sends the releases still pending (briefly), then stops the background tasks."""
        await asyncio.sleep(0)  # lets calls queued in this turn go out
        await self._scripts.drain(2.0)
        for task in (self._renewer, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._client.aclose()


def _or_none(limit: int | None) -> int:
    return -1 if limit is None else limit


def _reset(value: bytes) -> float | None:
    seconds = float(value)
    return None if seconds < 0 else seconds

"""The immutable route table built from one config snapshot: public model id -> backends."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

from yarl import URL

from gateway.client_keys import KeyRing
from gateway.config import (
    CacheAware,
    CircuitBreaker,
    Endpoint,
    GatewayConfig,
    HealthCheck,
    Strategy,
    Timeouts,
)

WILDCARD = "/*"


def base_url(url: str) -> URL:
    """A bare origin (`http://host:8000`) means `http://host:8000/v1`; any path is kept as is."""
    parsed = URL(url)
    if parsed.path in ("", "/"):
        parsed = parsed.with_path("/v1")
    return parsed.with_path(parsed.path.rstrip("/"))


@dataclass(frozen=True, slots=True)
class Target:
    """One backend server of a route."""

    base_url: URL
    api_key: str | None
    model: str | None  # the model name it gets; None on wildcard routes (the client's, unprefixed)
    headers: Mapping[str, str]
    weight: float
    max_concurrent: int | None
    # Seconds between DNS look-ups when this target stands for every address its host
    # resolves to (`discover: "dns"`); None for a plain target.
    discover_interval: float | None = None
    # On a discovered address: the configured host, sent as Host and as TLS SNI, while
    # base_url names the address itself.
    server_name: str | None = None
    host_header: str | None = None
    # It can continue a partial assistant message (vLLM, SGLang, the worker): stream resume.
    resume: bool = False
    cache_tokens: int | None = None  # its prefix-cache size, when configured
    # Identity of the server for health and load state, shared by every route using it and
    # kept across reloads. Computed once: selection and accounting look it up per request.
    key: str = field(init=False, compare=False, repr=False)
    # What `own_headers` returns, as pairs, and the URLs of the paths asked for most: both
    # are needed on every request, and neither changes while the target lives.
    own_header_items: tuple[tuple[str, str], ...] = field(init=False, compare=False, repr=False)
    urls: dict[str, URL] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        secret = hashlib.sha256((self.api_key or "").encode()).hexdigest()[:8]
        object.__setattr__(self, "key", f"{self.base_url.with_password(None)}#{secret}")
        object.__setattr__(self, "own_header_items", tuple(self.own_headers().items()))
        object.__setattr__(self, "urls", {})

    @property
    def label(self) -> str:
        """Host and port, for logs, metrics and errors: never the path or credentials."""
        return f"{self.base_url.host}:{self.base_url.port}"

    def own_headers(self) -> dict[str, str]:
        """What every request to this backend carries: its configured headers and its key."""
        headers = dict(self.headers)
        if self.host_header:
            headers["Host"] = self.host_header
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


@dataclass(frozen=True, slots=True)
class Route:
    """One public model id (or wildcard prefix) and how its requests are routed."""

    public_id: str
    display_name: str
    targets: tuple[Target, ...]
    timeouts: Timeouts
    strategy: Strategy
    retries: int
    retry_on: frozenset[int]
    queue_timeout: float
    health_check: HealthCheck
    circuit_breaker: CircuitBreaker
    models_refresh: float
    max_resumes: int = 2
    cache_aware: CacheAware = field(default_factory=CacheAware)

    @property
    def wildcard(self) -> bool:
        return self.public_id.endswith(WILDCARD)

    @property
    def prefix(self) -> str:
        """`ollama/` for the route `ollama/*`."""
        return self.public_id[: -len(WILDCARD) + 1]

    def hop(self, model: str, target: Target) -> Hop:
        upstream = model[len(self.prefix) :] if self.wildcard else (target.model or model)
        return Hop(self, target, model, upstream)


@dataclass(frozen=True, slots=True)
class Hop:
    """One attempt of one request: the route, the backend chosen, and the model ids on each
    side (they differ per request on wildcard routes)."""

    route: Route
    target: Target
    public_id: str
    upstream_model: str

    @property
    def timeouts(self) -> Timeouts:
        return self.route.timeouts

    @property
    def backend_label(self) -> str:
        return self.target.label

    @property
    def base_url(self) -> URL:
        return self.target.base_url


def _timeouts(defaults: Timeouts, endpoint: Endpoint) -> Timeouts:
    if endpoint.timeouts is None:
        return defaults
    return defaults.model_copy(update=endpoint.timeouts.model_dump(exclude_unset=True))


def _targets(public_id: str, endpoint: Endpoint) -> tuple[Target, ...]:
    wildcard = public_id.endswith(WILDCARD)

    def model(own: str | None) -> str | None:
        return None if wildcard else (own or endpoint.actual_model_name or public_id)

    if endpoint.backends is None:
        assert endpoint.url is not None  # the schema requires one of the two
        return (
            Target(
                base_url(endpoint.url),
                endpoint.api_key or None,
                model(None),
                MappingProxyType(dict(endpoint.headers)),
                1.0,
                None,
                endpoint.discover_interval if endpoint.discover else None,
                resume=endpoint.resume,
            ),
        )
    return tuple(
        Target(
            base_url(backend.url),
            backend.api_key or endpoint.api_key or None,
            model(backend.actual_model_name),
            MappingProxyType({**endpoint.headers, **backend.headers}),
            backend.weight,
            backend.max_concurrent,
            backend.discover_interval if backend.discover else None,
            resume=endpoint.resume if backend.resume is None else backend.resume,
            cache_tokens=backend.cache_tokens,
        )
        for backend in endpoint.backends
    )


T = TypeVar("T")


def _or(own: T | None, default: T) -> T:
    return default if own is None else own


def build_route(public_id: str, endpoint: Endpoint, config: GatewayConfig) -> Route:
    """A route from an endpoint, its unset routing settings taken from the top level."""
    return Route(
        public_id=public_id,
        display_name=endpoint.display_name or public_id,
        targets=_targets(public_id, endpoint),
        timeouts=_timeouts(config.timeouts, endpoint),
        strategy=_or(endpoint.strategy, config.strategy),
        retries=_or(endpoint.retries, config.retries),
        retry_on=frozenset(_or(endpoint.retry_on, config.retry_on)),
        queue_timeout=_or(endpoint.queue_timeout, config.queue_timeout),
        health_check=_or(endpoint.health_check, config.health_check),
        circuit_breaker=_or(endpoint.circuit_breaker, config.circuit_breaker),
        models_refresh=endpoint.models_refresh,
        max_resumes=endpoint.max_resumes,
        cache_aware=_or(endpoint.cache_aware, config.cache_aware),
    )


@dataclass(frozen=True)
class Snapshot:
    """One loaded config and its routes; replaced whole on reload, never mutated."""

    config: GatewayConfig
    source: str
    version: int
    loaded_at: float = field(default_factory=time.time)
    routes: Mapping[str, Route] = field(init=False)
    keyring: KeyRing = field(init=False)
    _wildcards: tuple[Route, ...] = field(init=False)

    def __post_init__(self) -> None:
        routes = {
            public_id: build_route(public_id, endpoint, self.config)
            for public_id, endpoint in self.config.endpoints.items()
            if endpoint.enabled
        }
        object.__setattr__(self, "routes", MappingProxyType(routes))
        # Longest prefix first, so `ollama/big/*` wins over `ollama/*`.
        wildcards = sorted(
            (r for r in routes.values() if r.wildcard), key=lambda r: len(r.prefix), reverse=True
        )
        object.__setattr__(self, "_wildcards", tuple(wildcards))
        object.__setattr__(self, "keyring", KeyRing(self.config.keys))

    def resolve(self, model: str) -> Route | None:
        """The exact id first, then the longest wildcard prefix that matches."""
        route = self.routes.get(model)
        if route is not None and not route.wildcard:
            return route
        for wildcard in self._wildcards:
            if model.startswith(wildcard.prefix) and len(model) > len(wildcard.prefix):
                return wildcard
        return None

    def targets(self) -> dict[str, Target]:
        """Every backend server in this config, by identity."""
        return {t.key: t for route in self.routes.values() for t in route.targets}

    def secrets(self) -> set[str]:
        """Every configured value that must never appear in logs or responses."""
        found: set[str] = set()
        for target in self.targets().values():
            if target.api_key:
                found.add(target.api_key)
            found.update(v for v in target.headers.values() if v)
            if target.base_url.password:
                found.add(target.base_url.password)
        found.update(k.key for k in self.config.keys if not k.key.startswith("sha256:"))
        if self.config.redis_url:
            redis_password = URL(self.config.redis_url).password
            if redis_password:
                found.add(redis_password)
        return found

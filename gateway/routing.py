"""The immutable route table built from one config snapshot: public model id -> backend."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from yarl import URL

from gateway.config import Endpoint, GatewayConfig, Timeouts


@dataclass(frozen=True, slots=True)
class Route:
    """Everything needed to send one public model's requests to its backend."""

    public_id: str
    display_name: str
    base_url: URL
    api_key: str | None
    upstream_model: str
    headers: Mapping[str, str]
    timeouts: Timeouts

    @property
    def backend(self) -> str:
        """Host and port, for logs and errors: never the path or credentials."""
        return f"{self.base_url.host}:{self.base_url.port}"


def base_url(url: str) -> URL:
    """A bare origin (`http://host:8000`) means `http://host:8000/v1`; any path is kept as is."""
    parsed = URL(url)
    if parsed.path in ("", "/"):
        parsed = parsed.with_path("/v1")
    return parsed.with_path(parsed.path.rstrip("/"))


def _timeouts(defaults: Timeouts, endpoint: Endpoint) -> Timeouts:
    if endpoint.timeouts is None:
        return defaults
    overrides = endpoint.timeouts.model_dump(exclude_unset=True)
    return defaults.model_copy(update=overrides)


def build_route(public_id: str, endpoint: Endpoint, defaults: Timeouts) -> Route:
    return Route(
        public_id=public_id,
        display_name=endpoint.display_name or public_id,
        base_url=base_url(endpoint.url),
        api_key=endpoint.api_key or None,
        upstream_model=endpoint.actual_model_name or public_id,
        headers=MappingProxyType(dict(endpoint.headers)),
        timeouts=_timeouts(defaults, endpoint),
    )


@dataclass(frozen=True)
class Snapshot:
    """One loaded config and its routes; replaced whole on reload, never mutated."""

    config: GatewayConfig
    source: str
    version: int
    loaded_at: float = field(default_factory=time.time)
    routes: Mapping[str, Route] = field(init=False)

    def __post_init__(self) -> None:
        routes = {
            public_id: build_route(public_id, endpoint, self.config.timeouts)
            for public_id, endpoint in self.config.endpoints.items()
            if endpoint.enabled
        }
        object.__setattr__(self, "routes", MappingProxyType(routes))

    def resolve(self, model: str) -> Route | None:
        return self.routes.get(model)

    def secrets(self) -> set[str]:
        """Every configured value that must never appear in logs or responses."""
        found: set[str] = set()
        for route in self.routes.values():
            if route.api_key:
                found.add(route.api_key)
            found.update(v for v in route.headers.values() if v)
            if route.base_url.password:
                found.add(route.base_url.password)
        return found

"""`discover: "dns"`: one backend per address a backend's host resolves to, re-resolved on a
clock (Envoy's strict DNS, nginx's `resolve`), swapped into routes without a reload."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.backends import Backends
from gateway.background import TICK
from gateway.routing import Route, Snapshot, Target

if TYPE_CHECKING:
    from gateway.reload import ConfigStore

log = structlog.get_logger("gateway.dns_discovery")

# Addresses kept per discovered backend (the lowest, in sorted order): each is a
# `backend` label value in /metrics, so their number is bounded.
MAX_ADDRESSES = 32

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    """getaddrinfo through the loop's executor: /etc/hosts, resolv.conf, A and AAAA."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass
class Discovered:
    """What one discovered backend resolves to now, and how the last look-up went."""

    template: Target
    addresses: tuple[str, ...] = ()
    targets: tuple[Target, ...] = ()
    resolved_at: float | None = None  # wall clock of the last successful look-up
    error: str | None = None  # set while look-ups fail; the last good set keeps serving
    due: float = 0.0  # monotonic time of the next look-up

    def as_dict(self) -> dict[str, Any]:
        return {
            "addresses": [t.label for t in self.targets],
            "resolvedAt": self.resolved_at,
            "ok": self.error is None,
            "error": self.error,
            "interval": self.template.discover_interval,
        }


def address_target(template: Target, address: str) -> Target:
    """The template with its host swapped for one address; Host and SNI keep the name."""
    url = template.base_url
    assert url.host is not None
    host_header = url.host if url.is_default_port() else f"{url.host}:{url.port}"
    return dataclasses.replace(
        template,
        base_url=url.with_host(address),
        discover_interval=None,
        server_name=url.host,
        host_header=host_header,
    )


class DnsDiscovery:
    """The live address sets of every discovered backend, and routes expanded with them."""

    def __init__(self, registry: CollectorRegistry, resolver: Resolver = system_resolver) -> None:
        # A hook: tests point it at a table of names; production uses getaddrinfo.
        self.resolver = resolver
        self.backends: dict[str, Discovered] = {}  # by template key
        self._generation = 0
        self._pending = False
        self._expanded: dict[str, tuple[Route, int, Route]] = {}
        self._up = Gauge(
            "gateway_discovery_up",
            "1 while the last DNS look-up of a discovered backend succeeded.",
            ["backend"],
            registry=registry,
            multiprocess_mode="livemin",
        )
        self._addresses = Gauge(
            "gateway_discovery_addresses",
            "Addresses a discovered backend resolves to (the last good set).",
            ["backend"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self._failures = Counter(
            "gateway_discovery_failures_total",
            "Failed DNS look-ups of discovered backends.",
            ["backend"],
            registry=registry,
        )

    # -- the request path ---------------------------------------------------------------

    def expand(self, route: Route) -> Route:
        """The route with each discovered backend replaced by its addresses (the backend
        itself, dialled by name, until its first look-up answers). Cached until a set changes."""
        if not self.backends:
            return route
        cached = self._expanded.get(route.public_id)
        if cached is not None and cached[0] is route and cached[1] == self._generation:
            return cached[2]
        targets: list[Target] = []
        for target in route.targets:
            found = self.backends.get(target.key) if target.discover_interval else None
            targets.extend(found.targets if found is not None and found.targets else (target,))
        expanded = dataclasses.replace(route, targets=tuple(targets))
        self._expanded[route.public_id] = (route, self._generation, expanded)
        return expanded

    def target_keys(self) -> set[str]:
        """Every discovered address's identity, so a reload keeps their health and load."""
        return {t.key for found in self.backends.values() for t in found.targets}

    def status(self) -> dict[str, Any]:
        return {found.template.label: found.as_dict() for found in self.backends.values()}

    # -- the clock ----------------------------------------------------------------------

    def configure(self, snapshot: Snapshot) -> None:
        """Track the discovered backends of a (new) config, keeping known ones' sets."""
        wanted = {
            t.key: t
            for route in snapshot.routes.values()
            for t in route.targets
            if t.discover_interval
        }
        for key in self.backends.keys() - wanted.keys():
            gone = self.backends.pop(key)
            self._up.remove(gone.template.label)
            self._addresses.remove(gone.template.label)
        for key, template in wanted.items():
            if key not in self.backends:
                self.backends[key] = Discovered(template)
            self.backends[key].template = template
        self._changed()

    async def resolve_due(self) -> list[Target]:
        """Look up every backend whose interval has passed; returns addresses that joined."""
        now = time.monotonic()
        due = [found for found in self.backends.values() if found.due <= now]
        joined: list[Target] = []
        for found, result in zip(
            due, await asyncio.gather(*(self._look_up(f) for f in due)), strict=True
        ):
            found.due = now + (found.template.discover_interval or 10.0)
            joined.extend(self._apply(found, result))
        return joined

    async def _look_up(self, found: Discovered) -> list[str] | str:
        url = found.template.base_url
        assert url.host is not None and url.port is not None
        try:
            addresses = await self.resolver(url.host, url.port)
        except (OSError, UnicodeError) as exc:
            return str(exc) or type(exc).__name__
        return addresses or "no addresses"

    def _apply(self, found: Discovered, result: list[str] | str) -> list[Target]:
        label = found.template.label
        if isinstance(result, str):
            self._failures.labels(label).inc()
            self._up.labels(label).set(0)
            if found.error is None:  # once per outage, not once per interval
                log.warning(
                    "dns discovery failed; the last good addresses keep serving",
                    backend=label,
                    error=result,
                    addresses=[t.label for t in found.targets],
                )
            found.error = result
            return []
        if found.error is not None:
            log.info("dns discovery recovered", backend=label)
            found.error = None
        self._up.labels(label).set(1)
        addresses = tuple(_ordered(result)[:MAX_ADDRESSES])
        found.resolved_at = time.time()
        if addresses == found.addresses:
            return []
        before = set(found.addresses)
        found.addresses = addresses
        found.targets = tuple(address_target(found.template, a) for a in addresses)
        self._addresses.labels(label).set(len(addresses))
        log.info("dns discovery: addresses changed", backend=label, addresses=list(addresses))
        self._changed()
        return [t for t, a in zip(found.targets, addresses, strict=True) if a not in before]

    def _changed(self) -> None:
        self._generation += 1
        self._pending = True

    def take_changes(self) -> bool:
        """Whether an address set changed since the last call."""
        pending, self._pending = self._pending, False
        return pending


def _ordered(addresses: Iterable[str]) -> list[str]:
    """Unique, IPv4 before IPv6, numerically: a stable set whatever order DNS answers in."""
    unique = {ipaddress.ip_address(a.split("%", 1)[0]) for a in addresses}
    return [str(a) for a in sorted(unique, key=lambda a: (a.version, a))]


async def run_dns_discovery(
    discovery: DnsDiscovery, backends: Backends, store: ConfigStore
) -> None:
    """The background job: resolve what is due on the shared clock. A new address gets its
    health and load state at once; a vanished one's state goes once its requests are done."""
    while True:
        joined = await discovery.resolve_due()
        for target in joined:
            backends.state(target)
        if discovery.take_changes():
            backends.retain(set(store.current.targets()) | discovery.target_keys())
        await asyncio.sleep(TICK)

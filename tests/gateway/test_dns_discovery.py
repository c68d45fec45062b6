"""`discover: "dns"`: one backend per address a name resolves to, followed as addresses come
and go and as look-ups fail and recover. Several 127.0.0.x servers on one port stand behind
one name, through the resolver hook."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.config import ConfigError, load_config
from gateway.dns_discovery import MAX_ADDRESSES
from gateway.state import DNS, METRICS
from tests.gateway.backend import FakeBackend, Received, chunk, sse, start_sse

NAME = "models.test"


class Table:
    """The resolver hook: a name -> addresses table that can be told to fail."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.failing = False
        self.lookups = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups += 1
        if self.failing or host != NAME:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.addresses)


async def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    """Wait on the gateway's own counters (look-ups, address sets), not on a set time."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - the state lives in the gateway, no event
            await asyncio.sleep(0.02)


@pytest.fixture
async def servers() -> AsyncIterator[dict[str, FakeBackend]]:
    """127.0.0.1, .2 and .3, all on the same port."""
    first = await FakeBackend().start()
    started = {"127.0.0.1": first}
    for host in ("127.0.0.2", "127.0.0.3"):
        started[host] = await FakeBackend(host=host, port=first.port).start()
    yield started
    for server in started.values():
        await server.stop()


async def discovering(make_gateway, servers, table: Table, **backend: Any):
    port = servers["127.0.0.1"].port
    config = {
        "endpoints": {
            "llama": {
                "backends": [
                    {
                        "url": f"http://{NAME}:{port}/v1",
                        "discover": "dns",
                        "discoverInterval": 0.05,
                        **backend,
                    }
                ]
            }
        }
    }
    gw = await make_gateway(config)
    gw.app[DNS].resolver = table
    return gw


def served_by(servers: dict[str, FakeBackend]) -> dict[str, int]:
    return {host: len(server.received) for host, server in servers.items()}


def addresses(gw) -> list[str]:
    return [a.split(":")[0] for a in next(iter(gw.app[DNS].status().values()))["addresses"]]


async def test_each_address_is_a_backend_and_keeps_the_configured_host(
    make_gateway, servers, http
) -> None:
    table = Table("127.0.0.3", "127.0.0.1", "127.0.0.2", "127.0.0.1")
    gw = await discovering(make_gateway, servers, table)
    await until(lambda: len(addresses(gw)) == 3)
    assert addresses(gw) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]  # unique, ordered
    client = gw.openai()
    await asyncio.gather(
        *(client.chat.completions.create(model="llama", messages=[]) for _ in range(30))
    )
    counts = served_by(servers)
    assert sum(counts.values()) == 30 and all(n > 0 for n in counts.values()), counts
    port = servers["127.0.0.1"].port
    for server in servers.values():
        assert {r.headers["Host"] for r in server.received} == {f"{NAME}:{port}"}
    async with http.get(gw.url + "/debug") as response:
        debug = await response.json()
    labels = [b["url"] for b in debug["config"]["endpoints"]["llama"]["backends"]]
    assert len(labels) == 3 and all(NAME not in label for label in labels), labels
    assert debug["discovery"][f"{NAME}:{port}"]["ok"] is True
    metrics = gw.app[METRICS].render().decode()
    assert f'gateway_discovery_up{{backend="{NAME}:{port}"}} 1.0' in metrics
    assert f'gateway_discovery_addresses{{backend="{NAME}:{port}"}} 3.0' in metrics
    assert f'gateway_backend_requests_total{{backend="127.0.0.2:{port}"}}' in metrics


async def test_addresses_come_and_go_while_requests_flow(make_gateway, servers) -> None:
    table = Table("127.0.0.1", "127.0.0.2")
    gw = await discovering(make_gateway, servers, table)
    await until(lambda: addresses(gw) == ["127.0.0.1", "127.0.0.2"])
    release = asyncio.Event()

    async def held(request: web.Request, received: Received) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse(chunk("real", "before")))
        await release.wait()
        await response.write(sse(chunk("real", "after")))
        await response.write(b"data: [DONE]\n\n")
        return response

    for server in servers.values():
        server.handler = held
    client = gw.openai()
    streams = [
        await client.chat.completions.create(model="llama", messages=[], stream=True)
        for _ in range(6)
    ]
    firsts = [await anext(aiter(stream)) for stream in streams]
    assert {c.choices[0].delta.content for c in firsts} == {"before"}
    before = served_by(servers)
    assert before["127.0.0.2"] > 0 and before["127.0.0.3"] == 0, before

    # .2 leaves, .3 joins: new requests go to .1 and .3 only; .2's streams finish.
    table.addresses = ["127.0.0.1", "127.0.0.3"]
    await until(lambda: addresses(gw) == ["127.0.0.1", "127.0.0.3"])
    for server in servers.values():
        server.handler = FakeBackend.handler
    await asyncio.gather(
        *(client.chat.completions.create(model="llama", messages=[]) for _ in range(20))
    )
    after = served_by(servers)
    assert after["127.0.0.2"] == before["127.0.0.2"], after
    assert after["127.0.0.3"] > 0, after
    release.set()
    for stream in streams:
        rest = [c async for c in stream]
        assert [c.choices[0].delta.content for c in rest] == ["after"]

    # .2 comes back and takes requests again at once.
    table.addresses = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    await until(lambda: len(addresses(gw)) == 3)
    await asyncio.gather(
        *(client.chat.completions.create(model="llama", messages=[]) for _ in range(20))
    )
    assert served_by(servers)["127.0.0.2"] > after["127.0.0.2"]


async def test_a_failed_look_up_keeps_the_last_good_set_until_it_recovers(
    make_gateway, servers, http, capfd
) -> None:
    table = Table("127.0.0.1", "127.0.0.2")
    gw = await discovering(make_gateway, servers, table)
    await until(lambda: len(addresses(gw)) == 2)
    port = servers["127.0.0.1"].port
    label = f"{NAME}:{port}"
    capfd.readouterr()  # the look-up at start, before the hook was set, went to real DNS
    table.failing = True
    failed_at = table.lookups
    await until(lambda: table.lookups >= failed_at + 4)  # several failed look-ups in a row
    status = gw.app[DNS].status()[label]
    assert status["ok"] is False and "not known" in status["error"]
    assert addresses(gw) == ["127.0.0.1", "127.0.0.2"]
    client = gw.openai()
    await asyncio.gather(
        *(client.chat.completions.create(model="llama", messages=[]) for _ in range(10))
    )
    async with http.get(gw.url + "/ready") as response:
        assert response.status == 200  # still serving: the outage is shown, not fatal
        ready = await response.json()
    assert ready["discovery"][label]["ok"] is False
    metrics = gw.app[METRICS].render().decode()
    assert f'gateway_discovery_up{{backend="{label}"}} 0.0' in metrics
    assert f'gateway_discovery_failures_total{{backend="{label}"}}' in metrics
    table.failing = False
    table.addresses = ["127.0.0.3"]
    await until(lambda: addresses(gw) == ["127.0.0.3"])
    assert gw.app[DNS].status()[label]["ok"] is True
    logged = capfd.readouterr().err
    assert logged.count("dns discovery failed") == 1, logged  # once per outage
    assert logged.count("dns discovery recovered") == 1


async def test_addresses_are_capped_per_backend(make_gateway, servers) -> None:
    many = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(MAX_ADDRESSES + 10)]
    gw = await discovering(make_gateway, servers, Table(*many))
    await until(lambda: len(addresses(gw)) > 0)
    assert len(addresses(gw)) == MAX_ADDRESSES


async def test_a_reload_keeps_discovered_addresses_and_their_state(make_gateway, servers, http):
    table = Table("127.0.0.1", "127.0.0.2")
    gw = await discovering(make_gateway, servers, table)
    await until(lambda: len(addresses(gw)) == 2)
    config = json.loads(gw.config_path.read_text())
    config["endpoints"]["other"] = {"url": servers["127.0.0.3"].url}
    gw.config_path.write_text(json.dumps(config))
    async with http.post(gw.url + "/reload") as response:
        assert response.status == 200
    assert addresses(gw) == ["127.0.0.1", "127.0.0.2"]


def test_discover_takes_only_dns(tmp_path) -> None:
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps({"endpoints": {"m": {"url": "http://h:1/v1", "discover": "srv"}}}))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "endpoints.m.discover" in " ".join(caught.value.errors)
    path.write_text(
        json.dumps(
            {"endpoints": {"m": {"url": "http://h:1/v1", "discover": "dns", "discoverInterval": 0}}}
        )
    )
    with pytest.raises(ConfigError):
        load_config(path)


async def test_an_empty_answer_counts_as_a_failure(make_gateway, servers) -> None:
    """A headless Service with no ready pod answers nothing: the last good set keeps serving."""
    table = Table("127.0.0.1")
    gw = await discovering(make_gateway, servers, table)
    await until(lambda: addresses(gw) == ["127.0.0.1"])
    table.addresses = []
    label = next(iter(gw.app[DNS].status()))
    await until(lambda: gw.app[DNS].status()[label]["error"] == "no addresses")
    assert addresses(gw) == ["127.0.0.1"]
    reply = await gw.openai().chat.completions.create(model="llama", messages=[])
    assert reply.model == "llama"

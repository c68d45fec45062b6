"""The file watcher follows a Kubernetes ConfigMap mount through every update, not only the
first: the kubelet's atomic writer swaps a `..data` symlink to a new timestamped folder and
deletes the old folder each time."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.app import build_app
from gateway.reload import ReloadOutcome
from gateway.routing import Snapshot
from gateway.server import bound_port, start
from gateway.state import STORE
from tests.gateway.configmap import ConfigMapVolume


def endpoints(*names: str, url: str) -> dict[str, Any]:
    return {"endpoints": {name: {"url": url} for name in names}}


@pytest.fixture
async def mounted(tmp_path: Path, backend) -> AsyncIterator[tuple[ConfigMapVolume, Any]]:
    volume = ConfigMapVolume(tmp_path / "config")
    volume.root.mkdir()
    volume.publish(endpoints("v1", url=backend.url))
    app = build_app(volume.root / "gateway.json", watch=True)
    runner = await start(app, "127.0.0.1", 0)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{bound_port(runner)}/v1", api_key="x", max_retries=0
    )
    yield volume, (app, client)
    await client.close()
    await runner.cleanup()


async def test_every_configmap_update_reloads(mounted, backend) -> None:
    volume, (app, client) = mounted
    store = app[STORE]
    reloads: asyncio.Queue[ReloadOutcome] = asyncio.Queue()

    def on_reload(outcome: ReloadOutcome, _snapshot: Snapshot) -> None:
        reloads.put_nowait(outcome)

    store.subscribe(on_reload)
    await asyncio.sleep(0.3)  # let the watcher start watching
    for generation in range(2, 6):
        volume.publish(endpoints("v1", f"v{generation}", url=backend.url))
        outcome = await asyncio.wait_for(reloads.get(), 10)
        assert outcome.ok and outcome.trigger == "file", outcome
        assert outcome.added == [f"v{generation}"]
        models = [m.id async for m in client.models.list()]
        assert models == ["v1", f"v{generation}"]
    assert store.current.version == 5


async def test_a_config_linked_from_another_folder_is_followed_when_relinked(
    tmp_path: Path, backend
) -> None:
    """`--config /etc/gateway.json` linking to a file elsewhere: edits to the target reload,
    and so do edits to a new target after the link is pointed at another folder."""
    first, second, named = tmp_path / "a", tmp_path / "b", tmp_path / "etc"
    for folder in (first, second, named):
        folder.mkdir()
    (first / "real.json").write_text(json.dumps(endpoints("v1", url=backend.url)))
    (named / "gateway.json").symlink_to(first / "real.json")
    app = build_app(named / "gateway.json", watch=True)
    runner = await start(app, "127.0.0.1", 0)
    reloads: asyncio.Queue[ReloadOutcome] = asyncio.Queue()
    app[STORE].subscribe(lambda outcome, _snapshot: reloads.put_nowait(outcome))
    try:
        await asyncio.sleep(0.3)
        (first / "real.json").write_text(json.dumps(endpoints("v1", "v2", url=backend.url)))
        assert (await asyncio.wait_for(reloads.get(), 10)).added == ["v2"]
        (second / "real.json").write_text(json.dumps(endpoints("v3", url=backend.url)))
        (named / "tmp.json").symlink_to(second / "real.json")
        os.rename(named / "tmp.json", named / "gateway.json")
        assert (await asyncio.wait_for(reloads.get(), 10)).added == ["v3"]
        await asyncio.sleep(0.3)  # the watcher moves to the new folder
        (second / "real.json").write_text(json.dumps(endpoints("v3", "v4", url=backend.url)))
        assert (await asyncio.wait_for(reloads.get(), 10)).added == ["v4"]
    finally:
        await runner.cleanup()

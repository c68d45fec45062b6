"""The config file watcher: an edit reloads, other files in the folder do not wake it."""

from __future__ import annotations

import asyncio
import json

from gateway.state import STORE
from tests.gateway.configs import config


async def test_file_change_reloads(make_gateway, make_backend) -> None:
    a = await make_backend()
    gw = await make_gateway({"endpoints": {"one": {"url": a.url}}}, watch=True)
    await asyncio.sleep(0.3)  # let the watcher start
    gw.config_path.write_text(
        json.dumps({"endpoints": {"one": {"url": a.url}, "two": {"url": a.url}}})
    )
    for _ in range(100):
        models = [m.id async for m in gw.openai().models.list()]
        if models == ["one", "two"]:
            break
        await asyncio.sleep(0.1)
    assert models == ["one", "two"]
    # a broken edit is rejected and the last good config keeps serving
    gw.config_path.write_text('{"endpoints": ')
    store = gw.app[STORE]
    for _ in range(100):
        if store.last_reload is not None and not store.last_reload.ok:
            break
        await asyncio.sleep(0.1)
    assert store.last_reload.trigger == "file" and not store.last_reload.ok
    assert [m.id async for m in gw.openai().models.list()] == ["one", "two"]


async def test_other_files_beside_the_config_do_not_wake_the_watcher(
    make_gateway, backend, capfd
) -> None:
    """A log file next to the config must not feed a reload/log loop."""
    gw = await make_gateway(config(backend), watch=True)
    await asyncio.sleep(0.3)
    neighbour = gw.config_path.parent / "gateway.log"
    for i in range(5):
        neighbour.write_text(f"line {i}\n")
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.8)
    assert gw.app[STORE].last_reload is None
    assert "change detected" not in capfd.readouterr().err

"""The config file watcher: an edit reloads, other files in the folder do not wake it."""

from __future__ import annotations

import asyncio
import json

from gateway.reload import ConfigStore
from gateway.state import STORE
from tests.gateway.configs import config
from tests.gateway.waiting import until


async def watcher_running(store: ConfigStore) -> None:
    """Rewrite the config with the same content in new bytes until the watcher reloads it:
    then the watcher is running (writes made before it started are never seen)."""
    text = store.path.read_text()
    for spaces in range(1, 11):
        before = store.last_reload
        store.path.write_text(text + " " * spaces)
        try:
            await until(lambda b=before: store.last_reload is not b, within=1.0)
        except AssertionError:
            continue
        assert store.last_reload.trigger == "file" and store.last_reload.ok
        return
    raise AssertionError("the config watcher is not running")


def count_wakes(store: ConfigStore) -> list[int]:
    """Each wake of the watcher asks the store whether the file changed: count the asks."""
    wakes = [0]
    asked = store.changed_on_disk

    def counted() -> bool:
        wakes[0] += 1
        return asked()

    store.changed_on_disk = counted  # type: ignore[method-assign]
    return wakes


async def test_file_change_reloads(make_gateway, make_backend) -> None:
    a = await make_backend()
    gw = await make_gateway({"endpoints": {"one": {"url": a.url}}}, watch=True)
    await watcher_running(gw.app[STORE])
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
    store = gw.app[STORE]
    wakes = count_wakes(store)
    await watcher_running(store)
    version, wakes[0] = store.current.version, 0
    capfd.readouterr()
    neighbour = gw.config_path.parent / "gateway.log"
    for i in range(5):
        neighbour.write_text(f"line {i}\n")
        await asyncio.sleep(0.1)  # five separate changes, not one batch
    # The watcher sees changes in order: once it has seen this edit of the config, it has
    # seen the neighbour's too, had they woken it.
    barrier = store.last_reload
    gw.config_path.write_text(gw.config_path.read_text() + "\n")
    await until(lambda: store.last_reload is not barrier, what="the config edit seen")
    assert wakes[0] == 1  # the config edit only
    assert store.current.version == version + 1  # no reload but the config edit's
    assert store.last_reload.trigger == "file"
    assert "change detected" not in capfd.readouterr().err

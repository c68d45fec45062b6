"""The current config snapshot: atomic swap on reload, from the API, a file change or SIGHUP."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from watchfiles import Change, awatch

from gateway.config import ConfigError, load_config
from gateway.routing import Snapshot

log = structlog.get_logger("gateway.reload")


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    trigger: str  # api, file, sighup
    ok: bool
    at: float
    version: int
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "trigger": self.trigger,
            "ok": self.ok,
            "at": self.at,
            "version": self.version,
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "errors": self.errors,
        }


Listener = Callable[[ReloadOutcome, Snapshot], None]


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class ConfigStore:
    """Holds the one current Snapshot. Requests take a reference to it once and keep it,
    so a reload never changes the config under a request that already started."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._digest = _digest(self.path)
        self.current = Snapshot(load_config(self.path), str(self.path), version=1)
        self.last_reload: ReloadOutcome | None = None
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Called after every reload attempt, successful or not."""
        self._listeners.append(listener)

    def reload(self, trigger: str) -> ReloadOutcome:
        """Validate the file fully, then swap; a broken file leaves the current config serving."""
        old = self.current
        digest = _digest(self.path)
        try:
            config = load_config(self.path)
        except ConfigError as exc:
            outcome = ReloadOutcome(trigger, False, time.time(), old.version, errors=exc.errors)
        else:
            new = Snapshot(config, str(self.path), version=old.version + 1)
            # Routes, not raw endpoints: an endpoint switched off is "removed", and a
            # global timeout change is a change of every route it reaches.
            before, after = old.routes, new.routes
            outcome = ReloadOutcome(
                trigger,
                True,
                time.time(),
                new.version,
                added=[m for m in after if m not in before],
                removed=[m for m in before if m not in after],
                changed=[m for m in after if m in before and after[m] != before[m]],
            )
            self.current = new
        self._digest = digest
        self.last_reload = outcome
        for listener in self._listeners:
            listener(outcome, self.current)
        if outcome.ok:
            log.info(
                "config reloaded",
                trigger=trigger,
                version=outcome.version,
                added=outcome.added,
                removed=outcome.removed,
                changed=outcome.changed,
            )
        else:
            log.error(
                "config reload rejected; previous config keeps serving",
                trigger=trigger,
                errors=outcome.errors,
            )
        return outcome

    def changed_on_disk(self) -> bool:
        return _digest(self.path) != self._digest


def _concerns(*config_names: str) -> Callable[[Change, str], bool]:
    """Only the config file, and the `..data` link Kubernetes swaps under a ConfigMap, wake
    the watcher: anything else in the folder (a log file beside the config, say) must not."""

    def accept(_change: Change, path: str) -> bool:
        name = Path(path).name
        return name in config_names or name.startswith("..")

    return accept


def _watched(path: Path) -> tuple[Path, ...]:
    """The folder the config is named in, and the folder it really lives in when it is a
    symlink to somewhere else. A ConfigMap's file links into a timestamped folder inside
    the mount that the kubelet deletes at the next update: the `..data` swap in the named
    folder is what announces every update, so that folder alone is watched."""
    named = path.absolute().parent
    real = path.resolve().parent
    return (named,) if real.is_relative_to(named) else (named, real)


async def watch_config(store: ConfigStore, debounce_ms: int = 300) -> None:
    """Reload when the file's content changes. Folders are watched, not the file, because
    editors and Kubernetes ConfigMaps replace files by renaming."""
    while True:
        folders = _watched(store.path)
        stop = asyncio.Event()
        changes = awatch(
            *folders,
            watch_filter=_concerns(store.path.name, store.path.resolve().name),
            debounce=debounce_ms,
            recursive=False,
            step=50,
            stop_event=stop,
        )
        async for _ in changes:
            if store.changed_on_disk():
                store.reload("file")
            if _watched(store.path) != folders:
                stop.set()  # the symlink was pointed at another folder: watch that one
        if not stop.is_set():
            return
        if store.changed_on_disk():  # an edit made while the watcher moved
            store.reload("file")


async def run_watcher(store: ConfigStore) -> None:
    """The watcher task: logs and keeps going rather than dying silently."""
    while True:
        try:
            await watch_config(store)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("config file watcher failed; restarting in 5 s")
            await asyncio.sleep(5)

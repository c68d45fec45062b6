"""The optional usage log: one JSON line per model request (`usageLog` in the config).

Requests only put their line in a bounded queue; a thread of its own writes the lines out.
A slow or full disk then never blocks the event loop nor fails a request: a write that fails
loses its lines, counted in `gateway_usage_log_errors_total` and logged once per outage."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import structlog

log = structlog.get_logger("gateway.usage")

# Lines waiting for the writer; past this (a disk far slower than the traffic) lines are
# dropped and counted rather than held without bound.
QUEUE_LINES = 10_000
# Lines written before each flush, at most: one write per burst, not per line.
BATCH_LINES = 1_000
# How long closing waits for the writer to write what is queued.
CLOSE_TIMEOUT = 5.0

_STOP = None
Item = tuple[str, dict[str, Any]] | None
OnError = Callable[[str, int], None]  # (reason, lines lost)


class UsageLog:
    """Appends to the file the current config names; reopens when a reload changes it."""

    def __init__(self, on_error: OnError | None = None, capacity: int = QUEUE_LINES) -> None:
        self._queue: queue.Queue[Item] = queue.Queue(capacity)
        self._on_error = on_error or (lambda _reason, _lines: None)
        self._thread: threading.Thread | None = None
        self._overflowing = False

    def write(self, path: str | None, entry: dict[str, Any]) -> None:
        """Queue a line for `path` (None: no usage log). Never blocks, never raises."""
        if path is None:
            return
        if self._thread is None:
            writer = _Writer(self._queue, self._on_error)
            self._thread = threading.Thread(target=writer.run, name="usage-log", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait((path, {"time": round(time.time(), 3), **entry}))
        except queue.Full:
            self._on_error("queue_full", 1)
            if not self._overflowing:
                log.error("usage log writer is behind; dropping lines", queued=QUEUE_LINES)
            self._overflowing = True
            return
        self._overflowing = False

    def wait_written(self) -> None:
        """Block until every line queued so far has been written (or counted as lost)."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued (for at most CLOSE_TIMEOUT), then stop the writer. Blocks:
        call it from a thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.join(CLOSE_TIMEOUT)


class _Writer:
    """The writer thread's side: the open file, and whether writing is failing."""

    def __init__(self, lines: queue.Queue[Item], on_error: OnError) -> None:
        self._queue = lines
        self._on_error = on_error
        self._path: str | None = None
        self._file: IO[str] | None = None
        self._failing = False

    def run(self) -> None:
        while True:
            batch = self._next_batch()
            stop = _STOP in batch
            self._write([item for item in batch if item is not None])
            for _ in batch:
                self._queue.task_done()
            if stop:
                self._close()
                return

    def _next_batch(self) -> list[Item]:
        batch = [self._queue.get()]
        while len(batch) < BATCH_LINES and batch[-1] is not _STOP:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        flushed = 0  # lines of this batch known to be out; on a failure the rest is lost
        unflushed = 0
        try:
            for path, entry in items:
                if path != self._path or self._file is None:
                    self._flush_and_close()
                    flushed, unflushed = flushed + unflushed, 0
                    self._path = path
                    self._file = _open(path)
                self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")
                unflushed += 1
            self._flush()
        except OSError as exc:
            self._failed(len(items) - flushed, exc)
            return
        if self._failing:
            log.info("usage log writable again", path=self._path)
            self._failing = False

    def _flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def _flush_and_close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.flush()
            finally:
                with contextlib.suppress(OSError):
                    file.close()

    def _failed(self, lost: int, exc: OSError) -> None:
        self._on_error("write", lost)
        if not self._failing:
            log.error("cannot write the usage log", path=self._path, error=str(exc))
            self._failing = True
        # Reopen next time: the disk may have room again, or the file may be back.
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):
                file.close()

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            self._flush_and_close()


def _open(path: str) -> IO[str]:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8")

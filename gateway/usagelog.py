"""The optional usage log: one JSON line per model request (`usageLog` in the config)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

import structlog

log = structlog.get_logger("gateway.usage")


class UsageLog:
    """Appends to the file the current config names; reopens when a reload changes it."""

    def __init__(self) -> None:
        self._path: str | None = None
        self._file: IO[str] | None = None

    def write(self, path: str | None, entry: dict[str, Any]) -> None:
        if path != self._path:
            self.close()
            self._path = path
            if path is not None:
                try:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                    self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
                except OSError as exc:
                    log.error("cannot open the usage log", path=path, error=str(exc))
        if self._file is not None:
            line = json.dumps({"time": round(time.time(), 3), **entry}, separators=(",", ":"))
            self._file.write(line + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

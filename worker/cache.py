"""Where the worker keeps what it builds: `WORKER_CACHE_DIR`, else ~/.cache/llm-gateway."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(setting: str | None = None) -> Path:
    """The cache root: `setting` (the worker's cache_dir), else the environment, else home."""
    root = setting or os.environ.get("WORKER_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "llm-gateway"

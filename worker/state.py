"""What one worker app holds at run time, reached through `app[STATE]`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import web

from worker.embeddings import Embedder
from worker.engine import Engine
from worker.metrics import Metrics
from worker.models import LoadedModel
from worker.settings import Settings


@dataclass
class WorkerState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    status: str = "loading"  # loading -> ok, or error
    error: str | None = None
    loaded: LoadedModel | None = None
    engine: Engine | None = None
    # By model id: the served model's own pooled states, plus --embedding-model if given.
    embedders: dict[str, Embedder] = field(default_factory=dict)
    # Embedding forwards run here, one at a time, off the event loop.
    embed_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="embed")
    )


STATE = web.AppKey("worker_state", WorkerState)

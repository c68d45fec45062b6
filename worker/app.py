"""build_app(): routes, middlewares and the model's lifecycle. Wiring only."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import web

from wire.errors import error_middleware
from wire.tracing import start_tracing
from worker import embeddings, models
from worker.engine import Engine
from worker.handlers import admin, completions, tokenize
from worker.handlers import embeddings as embeddings_handler
from worker.middleware import auth_middleware, echo_request_id, request_context
from worker.models import LoadedModel
from worker.settings import Settings
from worker.state import STATE, WorkerState
from worker.tracing import tracing_middleware

log = structlog.get_logger(__name__)

Loader = Callable[[Settings], LoadedModel]


def build_app(settings: Settings, loader: Loader = models.load) -> web.Application:
    state = WorkerState(settings)
    # Off (None) unless an OTLP endpoint is set in the environment.
    tracing = start_tracing("llm-worker", state.metrics.count_dropped_spans)
    middlewares = [request_context, error_middleware]
    if tracing is not None:  # outside the error envelope: it sees every answer's status
        middlewares.insert(1, tracing_middleware(tracing))
    if settings.api_key:
        middlewares.append(auth_middleware(settings.api_key))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[STATE] = state
    if tracing is not None:
        app.on_cleanup.append(lambda _: tracing.close())
    app.on_response_prepare.append(echo_request_id)
    app.cleanup_ctx.append(_model_lifecycle(loader))
    app.router.add_get("/health", admin.health)
    app.router.add_get("/ping", admin.ping)
    app.router.add_get("/metrics", admin.metrics)
    app.router.add_get("/v1/models", admin.models)
    app.router.add_get("/v1/models/{model:.+}", admin.model)
    app.router.add_post("/v1/chat/completions", completions.chat_completions)
    app.router.add_post("/v1/completions", completions.completions)
    app.router.add_post("/v1/embeddings", embeddings_handler.embeddings)
    app.router.add_post("/v1/tokenize", tokenize.tokenize)
    app.router.add_post("/v1/detokenize", tokenize.detokenize)
    # vLLM serves these two without the /v1 prefix as well.
    app.router.add_post("/tokenize", tokenize.tokenize)
    app.router.add_post("/detokenize", tokenize.detokenize)
    return app


def _model_lifecycle(loader: Loader) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]
        # Load in the background: the server answers /health (503, loading) meanwhile.
        task = asyncio.create_task(_load(state, loader))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if state.engine is not None:
            await asyncio.to_thread(state.engine.stop)
        state.embed_executor.shutdown(wait=False, cancel_futures=True)

    return lifecycle


async def _load(state: WorkerState, loader: Loader) -> None:
    settings = state.settings
    try:
        loaded = await asyncio.to_thread(loader, settings)
        state.loaded = loaded
        state.embedders[loaded.served_name] = embeddings.from_served_model(
            loaded.served_name, loaded.model, loaded.tokenizer, loaded.max_model_len
        )
        if settings.embedding_model:
            extra = await asyncio.to_thread(
                embeddings.load_sentence_model,
                settings.embedding_model,
                settings.embedding_model_name,
                loaded.device,
            )
            state.embedders[extra.name] = extra
        # The engine starts last: on GPU it sizes its KV cache from the memory left free.
        engine = Engine(
            loaded,
            settings.max_batch_size,
            settings.max_queue,
            settings.kv_cache_tokens,
            prefix_caching=settings.prefix_caching,
        )
        state.engine = engine
        await asyncio.to_thread(engine.start)
        state.metrics.watch(
            lambda: engine.running,
            lambda: engine.waiting,
            engine.kv_usage,
            engine.kv_capacity_tokens,
            engine.page_size,
            (lambda: engine.prefix_queries, lambda: engine.prefix_hits),
        )
        state.status = "ok"
        log.info("worker_ready", model=loaded.served_name)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        state.status, state.error = "error", f"{type(exc).__name__}: {exc}"
        log.exception("worker_failed_to_start")

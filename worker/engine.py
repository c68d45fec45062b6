"""The batching engine: transformers' ContinuousBatchingManager behind an asyncio interface."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog
from transformers import GenerationConfig
from transformers.generation import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import LogitsProcessorList

from worker.models import LoadedModel
from worker.sampling import RequestSampler, SamplingParams

log = structlog.get_logger(__name__)

# Without a setting, a CPU KV cache holds this many tokens at most: the manager would
# otherwise size it from free RAM (13 s and ~8 GB here) and its attention mask grows with it.
CPU_DEFAULT_KV_TOKENS = 32768
CPU_PAGE_SIZE = 64
# Tokens one forward pass may carry on CPU: longer prompts are prefilled in chunks, which
# bounds both the step time other streams wait for and the attention mask's size.
CPU_MAX_BATCH_TOKENS = 512


class QueueFull(Exception):
    """Every slot is busy and the waiting line is at its limit."""


class EngineUnavailable(Exception):
    """The engine is not (or no longer) able to take requests."""


class EngineError(Exception):
    """The engine failed a request."""


@dataclass(frozen=True)
class Step:
    """New tokens for one request; `finish_reason` is set on the last one."""

    token_ids: list[int]
    finish_reason: str | None = None


class Engine:
    """Owns the model's generation thread; many coroutines stream from it at once.

    Admission is ours: at most `max_batch_size` requests are inside the manager, up to
    `max_queue` more wait here for a slot, and anything beyond that is refused at once.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch_size: int,
        max_queue: int,
        kv_cache_tokens: int | None = None,
        prefix_caching: bool = False,
    ) -> None:
        self.loaded = loaded
        self.prefix_caching = prefix_caching
        # Prompt tokens looked up in, and found in, the shared prefix blocks (vLLM's
        # prefix_cache_queries / prefix_cache_hits), counted on the generation thread.
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._kv_cache_tokens = kv_cache_tokens
        self._manager: Any = None
        self._sampler = RequestSampler()
        self._slots = asyncio.Semaphore(max_batch_size)
        self._ids = itertools.count()
        self.running = 0
        self.waiting = 0
        self.kv_capacity_tokens = 0
        self.page_size = 0

    # -- lifecycle (blocking; call from a worker thread) -------------------------------

    def start(self) -> None:
        model = self.loaded.model
        on_cpu = self.loaded.device.type == "cpu"
        cb_kwargs: dict[str, Any] = {
            "max_requests_per_batch": self.max_batch_size,
            # The sampler keeps per-step Python state: the loop must run step by step.
            "use_async_batching": False,
            "use_cuda_graph": False,
            # The issue asks for SDPA, and the embeddings path runs the same module.
            "auto_switch_to_flash": False,
            # Prefix caching: a new request reuses the KV blocks of an earlier prompt's prefix.
            "allow_block_sharing": self.prefix_caching,
        }
        kv_tokens = self._kv_cache_tokens
        if on_cpu:
            kv_tokens = kv_tokens or min(
                CPU_DEFAULT_KV_TOKENS, self.max_batch_size * self.loaded.max_model_len
            )
            cb_kwargs["page_size"] = CPU_PAGE_SIZE
            cb_kwargs["max_batch_tokens"] = CPU_MAX_BATCH_TOKENS
        else:
            # Our sampler makes vocabulary-sized temporaries the manager did not plan for.
            cb_kwargs["max_memory_percent"] = 0.8
        if kv_tokens:
            page = cb_kwargs.get("page_size", ContinuousBatchingConfig.page_size)
            cb_kwargs["num_blocks"] = max(1, -(-kv_tokens // page))
        self.page_size = cb_kwargs.get("page_size", ContinuousBatchingConfig.page_size)
        generation_config = GenerationConfig(
            do_sample=False,  # the sampler picks tokens; the manager's argmax only reads them
            eos_token_id=self.loaded.eos_token_ids or -1,
            max_new_tokens=self.loaded.max_model_len,
        )
        manager = model.init_continuous_batching(
            generation_config=generation_config,
            continuous_batching_config=ContinuousBatchingConfig(**cb_kwargs),
        )
        processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList([self._sampler]))
        processors.tensors_required = 1
        processors.do_processing = True
        manager.logit_processor = processors
        manager.start()
        self._manager = manager
        self._wait_for_cache()
        if self.prefix_caching:
            self._count_prefix_hits(manager.batch_processor.cache)
        log.info(
            "engine_started",
            max_batch_size=self.max_batch_size,
            max_queue=self.max_queue,
            kv_cache_tokens=self.kv_capacity_tokens,
        )

    def _wait_for_cache(self) -> None:
        # The manager builds its cache on its own thread; capacity is known once it exists.
        deadline = time.monotonic() + 600
        while self._manager.batch_processor is None:
            if not self._manager.is_running():
                raise RuntimeError("the generation loop stopped while starting")
            if time.monotonic() > deadline:
                raise RuntimeError("the KV cache was not ready after 10 minutes")
            time.sleep(0.01)
        self.kv_capacity_tokens = int(self._manager.batch_processor.cache.max_tokens_read)
        if self.kv_capacity_tokens < self.loaded.max_model_len:
            log.warning(
                "max_model_len_reduced",
                requested=self.loaded.max_model_len,
                kv_cache_tokens=self.kv_capacity_tokens,
            )
            self.loaded.max_model_len = self.kv_capacity_tokens

    def _count_prefix_hits(self, cache: Any) -> None:
        """transformers counts nothing: wrap the one call its scheduler makes per prompt."""
        search = cache.search_prefix_match

        def counted(request_id: str, prompt_ids: list[int]) -> int:
            matched = search(request_id, prompt_ids)
            self.prefix_queries += len(prompt_ids)
            self.prefix_hits += matched
            return matched

        cache.search_prefix_match = counted

    def kv_usage(self) -> float:
        """The fraction of the KV cache's sectors in use (what vLLM calls kv_cache_usage_perc),
        read without a lock from the manager's pool: a gauge may be a step behind."""
        try:
            pool = self._manager.batch_processor.cache.pool
            return 1.0 - pool.num_free_sectors / max(1, pool.num_sectors)
        except AttributeError:  # not started, or stopped
            return 0.0

    def stop(self) -> None:
        # The generation thread is not a daemon: without this the process never exits.
        if self._manager is not None and self._manager.is_running():
            self._manager.stop(block=True, timeout=30)

    @property
    def alive(self) -> bool:
        return self._manager is not None and self._manager.is_running()

    # -- requests (event loop) ---------------------------------------------------------

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """Admit a request now (or raise QueueFull / EngineUnavailable) and return its stream.

        Admission happens here, synchronously, so a refusal can still become a plain 503
        before a streaming response has started.
        """
        if not self.alive:
            raise EngineUnavailable("the generation engine is not running")
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise QueueFull(
                f"all {self.max_batch_size} slots are busy and {self.waiting} requests are "
                f"waiting (limit {self.max_queue})"
            )
        self.waiting += 1
        return Generation(self, prompt_ids, params)

    async def _slot(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Step]:
        # Entered with `waiting` already counted by generate().
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            async for step in self._run(prompt_ids, params):
                yield step
        finally:
            self.running -= 1
            self._slots.release()

    async def _run(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Step]:
        manager = self._manager
        request_id = f"req-{next(self._ids)}"
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        eos = set() if params.ignore_eos else set(self.loaded.eos_token_ids)
        # Register before adding: the other order can lose the first outputs.
        manager.register_result_handler(request_id, outputs.put_nowait)
        finished = False
        try:
            added = manager.add_request(
                prompt_ids,
                request_id=request_id,
                max_new_tokens=params.max_tokens,
                streaming=True,
                eos_token_id=-1 if params.ignore_eos else None,
                sampling=params,
            )
            if added is None:
                raise EngineUnavailable("the generation engine is not accepting requests")
            sent = 0
            while not finished:
                output = await outputs.get()
                if output.error:
                    finished = True
                    raise EngineError(output.error)
                tokens = output.generated_tokens
                new, sent = tokens[sent:], len(tokens)
                finished = output.is_finished()
                reason = None
                if finished:
                    reason = "stop" if tokens and tokens[-1] in eos else "length"
                if new or reason:
                    yield Step(new, reason)
        finally:
            if not finished:
                # Cancelling delivers no final output, so the handler is ours to remove.
                manager.cancel_request(request_id)
                with manager.output_router._lock:
                    manager.output_router.result_handlers.pop(request_id, None)
            self._sampler.forget(request_id)


class Generation:
    """One admitted request's token stream. Always `aclose()` it: that frees its place
    in line or its slot, and cancels it in the manager if it has not finished."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams) -> None:
        self._engine = engine
        self._steps = engine._slot(prompt_ids, params)
        self._started = False
        self._closed = False

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Step:
        if self._closed:
            raise StopAsyncIteration
        self._started = True
        return await self._steps.__anext__()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._started:
            await self._steps.aclose()
        else:
            # Never iterated: the generator body never ran, so undo the admission here.
            self._engine.waiting -= 1

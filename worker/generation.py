"""One choice's text stream: engine tokens through the detokenizer and the stop strings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from worker.detokenize import IncrementalDetokenizer, StopFilter
from worker.engine import Engine, Generation
from worker.sampling import SamplingParams


@dataclass(frozen=True)
class Delta:
    text: str
    finish_reason: str | None
    completion_tokens: int


class TextStream:
    """Text deltas of one request. Created admitted (see `Engine.generate`); always aclose()."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        prompt_ids: list[int],
        params: SamplingParams,
        stops: list[str],
    ) -> None:
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._tokens: Generation = engine.generate(prompt_ids, params)
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop = StopFilter(stops)

    def __aiter__(self) -> TextStream:
        return self

    async def __anext__(self) -> Delta:
        while self.finish_reason is None:
            step = await anext(self._tokens)
            self.completion_tokens += len(step.token_ids)
            text = self._stop.feed(self._detok.push(step.token_ids))
            if not self._stop.stopped and step.finish_reason:
                text += self._stop.feed(self._detok.flush())
                text += self._stop.flush()
            if self._stop.stopped:
                self.finish_reason = "stop"
                # Stop here and now: closing the token stream cancels the rest in the engine.
                await self._tokens.aclose()
            elif step.finish_reason:
                self.finish_reason = step.finish_reason
            if text or self.finish_reason:
                return Delta(text, self.finish_reason, self.completion_tokens)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        await self._tokens.aclose()


async def merge(streams: list[TextStream]) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:  # the common case needs no tasks
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Delta | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: TextStream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((index, delta, None))
            queue.put_nowait((index, None, None))
        except Exception as exc:
            queue.put_nowait((index, None, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, delta, error = await queue.get()
            if error is not None:
                raise error
            if delta is None:
                remaining -= 1
            else:
                yield index, delta
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

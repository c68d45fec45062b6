"""Per-request sampling (temperature, top-k/p, seed, penalties) as one batched logits step."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
)
from transformers.generation.continuous_batching.requests import FutureRequestState


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves sampling out gets: the model's generation_config.json
    values where it sets them (as vLLM does), else OpenAI's defaults."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def from_generation_config(cls, config: object) -> SamplingDefaults:
        def value(name: str, default: float) -> float:
            found = getattr(config, name, None)
            return default if found is None else found

        return cls(
            temperature=float(value("temperature", 1.0)),
            top_p=float(value("top_p", 1.0)),
            top_k=max(0, int(value("top_k", 0))),
        )


@dataclass(frozen=True)
class SamplingParams:
    """What one request asked for; `temperature == 0` means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class RequestSampler(ContinuousBatchingLogitsProcessor):
    """Chooses each request's next token itself and hands the manager a one-hot score row.

    transformers' manager samples with one global switch (greedy or not) and per-request
    temperature/top-k/top-p only, with no per-request seed and no presence/frequency penalty.
    Run with the manager in greedy mode, this processor does the whole choice per row and
    leaves a single finite score, so the manager's argmax picks exactly that token.

    It keeps Python state between `prepare_tensor_args` and `__call__`, so the manager must run
    synchronously (no async double-buffering, no CUDA graphs, no compile): the engine sets that.
    """

    supported_kwargs: dict[str, type] = {"sampling": SamplingParams}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._rows: list[tuple[str, SamplingParams | None, list[int]]] = []
        self._generators: dict[str, torch.Generator] = {}
        self._lock = threading.Lock()

    def forget(self, request_id: str) -> None:
        """Drop a finished request's seeded generator."""
        with self._lock:
            self._generators.pop(request_id, None)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(
        self, requests_with_new_token: list[FutureRequestState]
    ) -> torch.Tensor:
        rows = []
        for future in requests_with_new_token:
            state = future.state
            params = state.logit_processor_kwargs.get("sampling")
            generated: list[int] = []
            if params is not None and params.penalized:
                # After a soft reset the manager folds generated tokens into the prompt.
                generated = (
                    state.initial_tokens[state._true_initial_tokens :]
                    if (state._true_initial_tokens)
                    else []
                )
                generated = generated + state.generated_tokens
            rows.append((state.request_id, params, generated))
        self._rows = rows
        return torch.zeros(len(rows), dtype=torch.int32)

    def _generator(self, request_id: str, seed: int, device: torch.device) -> torch.Generator:
        with self._lock:
            gen = self._generators.get(request_id)
            if gen is None:
                gen = torch.Generator(device=device)
                gen.manual_seed(seed)
                self._generators[request_id] = gen
            return gen

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows = self._rows[: scores.size(0)]
        if all(p is None or (p.greedy and not p.penalized) for _, p, _ in rows):
            return scores
        scores = scores.clone()
        sampled: list[int] = []
        for i, (_, params, generated) in enumerate(rows):
            if params is None:
                continue
            if params.penalized and generated:
                ids = torch.tensor(generated, device=scores.device)
                counts = torch.bincount(ids, minlength=scores.size(1))[: scores.size(1)]
                counts = counts.to(scores.dtype)
                scores[i] -= params.frequency_penalty * counts
                scores[i] -= params.presence_penalty * (counts > 0).to(scores.dtype)
            if not params.greedy:
                sampled.append(i)
        if not sampled:
            return scores
        choice = torch.empty(len(sampled), dtype=torch.long, device=scores.device)
        for j, i in enumerate(sampled):
            request_id, params, _ = rows[i]
            assert params is not None
            probs = _filtered_probs(scores[i], params)
            gen = None
            if params.seed is not None:
                gen = self._generator(request_id, params.seed, scores.device)
            choice[j] = torch.multinomial(probs, 1, generator=gen)[0]
        index = torch.tensor(sampled, device=scores.device)
        one_hot = torch.full((len(sampled), scores.size(1)), float("-inf"), device=scores.device)
        one_hot.scatter_(1, choice.unsqueeze(1), 0.0)
        scores[index] = one_hot
        return scores


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order `generate` uses), as probabilities."""
    logits = logits / params.temperature
    vocab = logits.size(0)
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass
        # before it already does. The first token always stays.
        drop = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        drop[0] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits.softmax(-1)

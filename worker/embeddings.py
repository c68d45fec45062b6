"""Embeddings: mean-pooled hidden states of the served model, or a sentence-embedding model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import structlog
import torch

log = structlog.get_logger(__name__)


class Embedder:
    """Runs a bidirectional or causal encoder and pools its last hidden states.

    `embed` blocks on torch: call it from a worker thread, never on the event loop.
    """

    def __init__(
        self,
        name: str,
        encoder: Any,
        tokenizer: Any,
        max_len: int,
        pooling: str = "mean",
        normalize: bool = True,
    ) -> None:
        self.name = name
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.pooling = pooling
        self.normalize = normalize

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    @torch.inference_mode()
    def embed(self, batch: list[list[int]]) -> list[list[float]]:
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask, use_cache=False)
        states = hidden.last_hidden_state.float()  # [batch, tokens, dim]
        if self.pooling == "cls":
            pooled = states[:, 0]
        elif self.pooling == "last":
            pooled = states[torch.arange(len(batch)), mask.sum(1) - 1]
        else:
            weights = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.cpu().tolist()


def from_served_model(name: str, model: Any, tokenizer: Any, max_len: int) -> Embedder:
    """The causal LM's own base model, mean-pooled: useful, not state of the art."""
    return Embedder(name, model.base_model, tokenizer, max_len, pooling="mean", normalize=True)


def load_sentence_model(path: str, name: str | None, device: torch.device) -> Embedder:
    """A sentence-transformers folder (e.g. all-MiniLM-L6-v2), loaded with plain transformers.

    Pooling and normalization are read from the folder's `1_Pooling/config.json` and
    `modules.json`, so the vectors match sentence-transformers' own.
    """
    from transformers import AutoModel, AutoTokenizer

    folder = Path(path)
    pooling, normalize = "mean", False
    pooling_config = folder / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        cfg = json.loads(pooling_config.read_text())
        if cfg.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif cfg.get("pooling_mode_lasttoken"):
            pooling = "last"
    modules = folder / "modules.json"
    if modules.is_file():
        normalize = any(
            m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text())
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path).to(device).eval()
    max_len = min(
        getattr(encoder.config, "max_position_embeddings", 512) or 512,
        getattr(tokenizer, "model_max_length", 512) or 512,
    )
    name = name or folder.resolve().name
    log.info("embedding_model_loaded", model=name, pooling=pooling, normalize=normalize)
    return Embedder(name, encoder, tokenizer, max_len, pooling=pooling, normalize=normalize)

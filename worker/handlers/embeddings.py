"""POST /v1/embeddings."""

from __future__ import annotations

import asyncio
import base64
import struct

from aiohttp import web

from wire.errors import APIError
from worker.handlers.common import check_model, parse, read_json, ready_state
from worker.protocol import EmbeddingRequest


async def embeddings(request: web.Request) -> web.Response:
    state = ready_state(request)
    req = parse(EmbeddingRequest, await read_json(request))
    check_model(state, req.model, embeddings=True)
    embedder = state.embedders[req.model]
    try:
        inputs = req.inputs()
    except ValueError as exc:
        raise APIError(400, str(exc), param="input") from None
    batch: list[list[int]] = []
    for i, item in enumerate(inputs):
        ids = embedder.tokenize(item) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, f"input[{i}] is empty.", param="input")
        if len(ids) > embedder.max_len:
            raise APIError(
                400,
                f"input[{i}] is {len(ids)} tokens; the maximum for {embedder.name} is "
                f"{embedder.max_len} tokens.",
                param="input",
                code="context_length_exceeded",
            )
        vocab = len(embedder.tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"input[{i}] has token ids outside [0, {vocab}).", param="input")
        batch.append(ids)
    loop = asyncio.get_running_loop()
    vectors = await loop.run_in_executor(state.embed_executor, embedder.embed, batch)
    if req.dimensions is not None and req.dimensions != len(vectors[0]):
        raise APIError(
            400,
            f"{embedder.name} makes {len(vectors[0])}-dimensional embeddings; "
            f"dimensions={req.dimensions} is not supported.",
            param="dimensions",
        )
    data = []
    for i, vec in enumerate(vectors):
        value: list[float] | str = vec
        if req.encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(len(ids) for ids in batch)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    request["usage"] = usage
    return web.json_response({"object": "list", "data": data, "model": req.model, "usage": usage})

"""POST /v1/embeddings."""

from __future__ import annotations

import asyncio
import base64
import struct

from aiohttp import web

from wire.errors import APIError
from wire.protocol import embedding_list
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
        raise APIError.bad_request(str(exc), param="input") from None
    batch: list[list[int]] = []
    for i, item in enumerate(inputs):
        ids = embedder.tokenize(item) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError.bad_request(f"input[{i}] is empty.", param="input")
        if len(ids) > embedder.max_len:
            raise APIError.bad_request(
                f"input[{i}] is {len(ids)} tokens; the maximum for {embedder.name} is "
                f"{embedder.max_len} tokens.",
                param="input",
                code="context_length_exceeded",
            )
        vocab = len(embedder.tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise APIError.bad_request(
                f"input[{i}] has token ids outside [0, {vocab}).", param="input"
            )
        batch.append(ids)
    loop = asyncio.get_running_loop()
    vectors = await loop.run_in_executor(state.embed_executor, embedder.embed, batch)
    if req.dimensions is not None and req.dimensions != len(vectors[0]):
        raise APIError.bad_request(
            f"{embedder.name} makes {len(vectors[0])}-dimensional embeddings; "
            f"dimensions={req.dimensions} is not supported.",
            param="dimensions",
        )
    encoded: list[list[float] | str] = list(vectors)
    if req.encoding_format == "base64":
        encoded = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
    body = embedding_list(req.model, encoded, sum(len(ids) for ids in batch))
    request["usage"] = body["usage"]
    return web.json_response(body)

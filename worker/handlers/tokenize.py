"""POST /v1/tokenize and /v1/detokenize, shaped as vLLM's."""

from __future__ import annotations

from aiohttp import web

from wire.errors import APIError
from worker.handlers.common import check_model, parse, read_json, ready_state
from worker.prompts import PromptError, chat_prompt_ids
from worker.protocol import DetokenizeRequest, TokenizeRequest


async def tokenize(request: web.Request) -> web.Response:
    state = ready_state(request)
    assert state.loaded is not None
    req = parse(TokenizeRequest, await read_json(request))
    check_model(state, req.model)
    tokenizer = state.loaded.tokenizer
    if req.messages is not None:
        try:
            ids = chat_prompt_ids(tokenizer, req.messages, req.add_generation_prompt)
        except PromptError as exc:
            raise APIError.bad_request(str(exc), param=exc.param) from None
    else:
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = list(tokenizer.encode(req.prompt or "", add_special_tokens=add_special))
    body = {
        "count": len(ids),
        "max_model_len": state.loaded.max_model_len,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None,
    }
    return web.json_response(body)


async def detokenize(request: web.Request) -> web.Response:
    state = ready_state(request)
    assert state.loaded is not None
    req = parse(DetokenizeRequest, await read_json(request))
    check_model(state, req.model)
    tokenizer = state.loaded.tokenizer
    vocab = len(tokenizer)
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError.bad_request(
            f"Token ids must be in [0, {vocab}); got {bad[:5]}.", param="tokens"
        )
    return web.json_response({"prompt": tokenizer.decode(req.tokens)})

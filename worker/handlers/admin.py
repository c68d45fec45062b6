"""GET /health, /ping, /metrics, /v1/models and /v1/models/{model}."""

from __future__ import annotations

from aiohttp import web

from wire.errors import APIError
from wire.protocol import ModelCard, model_card, model_list
from worker.handlers.common import ready_state
from worker.state import STATE, WorkerState


async def health(request: web.Request) -> web.Response:
    """200 once the engine can take requests; 503 while loading or after a failure."""
    state = request.app[STATE]
    engine = state.engine
    if state.status == "ok" and (engine is None or not engine.alive):
        state.status, state.error = "error", "the generation loop stopped"
    body: dict[str, object] = {"status": state.status}
    if state.error:
        body["error"] = state.error
    if state.loaded is not None:
        body.update(
            model=state.loaded.served_name,
            device=str(state.loaded.device),
            dtype=str(state.loaded.dtype).removeprefix("torch."),
            max_model_len=state.loaded.max_model_len,
        )
    if engine is not None:
        body.update(
            running=engine.running,
            waiting=engine.waiting,
            max_batch_size=engine.max_batch_size,
            max_queue=engine.max_queue,
            kv_cache_tokens=engine.kv_capacity_tokens,
        )
    status = 200 if state.status == "ok" else 503
    headers = {"Retry-After": "2"} if state.status == "loading" else None
    return web.json_response(body, status=status, headers=headers)


async def ping(request: web.Request) -> web.Response:
    return web.Response(text="pong")


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


def _cards(state: WorkerState) -> list[ModelCard]:
    """The served model, then each embedding model served beside it."""
    loaded = state.loaded
    assert loaded is not None
    cards = [
        model_card(
            loaded.served_name,
            created=loaded.created,
            owned_by=loaded.owned_by,
            max_model_len=loaded.max_model_len,
        )
    ]
    cards += [
        model_card(name, created=loaded.created, owned_by="llm-gateway-worker")
        for name in state.embedders
        if name != loaded.served_name
    ]
    return cards


async def models(request: web.Request) -> web.Response:
    return web.json_response(model_list(_cards(ready_state(request))))


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}: one card, or OpenAI's 404 for a model not served here."""
    model_id = request.match_info["model"]
    state = ready_state(request)
    cards = _cards(state)
    for card in cards:
        if card["id"] == model_id:
            return web.json_response(card)
    served = ", ".join(card["id"] for card in cards)
    raise APIError.not_found(
        f"The model '{model_id}' does not exist on this worker; it serves {served}.",
        param="model",
        code="model_not_found",
    )

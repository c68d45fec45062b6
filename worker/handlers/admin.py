"""GET /health, /ping, /metrics and /v1/models."""

from __future__ import annotations

from aiohttp import web

from worker.handlers.common import ready_state
from worker.state import STATE


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


async def models(request: web.Request) -> web.Response:
    state = ready_state(request)
    assert state.loaded is not None
    loaded = state.loaded
    data = [
        {
            "id": loaded.served_name,
            "object": "model",
            "created": loaded.created,
            "owned_by": loaded.owned_by,
            "max_model_len": loaded.max_model_len,
        }
    ]
    for name in state.embedders:
        if name != loaded.served_name:
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": loaded.created,
                    "owned_by": "llm-gateway-worker",
                }
            )
    return web.json_response({"object": "list", "data": data})

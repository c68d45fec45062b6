"""Helpers every handler uses: JSON bodies, schema errors, readiness and model checks."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from wire.errors import APIError
from worker.protocol import Unsupported
from worker.state import STATE, WorkerState

M = TypeVar("M", bound=BaseModel)


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError.bad_request(
            f"The body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise APIError.bad_request("The body must be a JSON object.", code="invalid_json")
    return body


def parse(schema: type[M], body: dict[str, Any]) -> M:
    """Validate `body`; the first problem becomes a 400 naming the parameter."""
    try:
        parsed = schema.model_validate(body)
        check = getattr(parsed, "check_supported", None)
        if check is not None:
            check()
        return parsed
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        message = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        if isinstance(given, int | float | str) and not isinstance(given, bool):
            message += f" (got {given!r})" if len(repr(given)) <= 40 else ""
        raise APIError.bad_request(
            f"{param}: {message}" if param else message, param=param
        ) from None
    except Unsupported as exc:
        raise APIError.bad_request(
            str(exc), param=exc.param, code="unsupported_parameter"
        ) from None


def ready_state(request: web.Request) -> WorkerState:
    """The state, once the model is loaded; a 503 with Retry-After until then."""
    state = request.app[STATE]
    if state.status == "loading":
        raise APIError.unavailable(
            "The model is still loading; retry shortly.", code="model_loading", retry_after=2
        )
    if state.status != "ok" or state.engine is None or not state.engine.alive:
        raise APIError.unavailable("The model worker is not healthy.", code="unavailable")
    return state


def check_model(state: WorkerState, name: str | None, *, embeddings: bool = False) -> None:
    served = [state.loaded.served_name] if state.loaded else []
    if embeddings:
        served = list(state.embedders)
    if name is None or name in served:
        return
    raise APIError.bad_request(
        f"The model `{name}` does not exist on this worker; it serves {', '.join(served)}.",
        param="model",
        code="model_not_found",
    )

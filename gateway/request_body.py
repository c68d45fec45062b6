"""The client's request body: its `model` found, and the body rewritten for each backend."""

from __future__ import annotations

import json
from typing import Any

from gateway.multipart import boundary_of, replace_model_field
from gateway.rewrite import dumps, loads, splice_models
from gateway.routing import Hop
from wire.errors import APIError

_INCLUDE_USAGE_MEMBER = b'"stream_options":{"include_usage":true}'


class RequestBody:
    """The request body with its `model` found, ready to be rewritten for a route."""

    def __init__(self, content_type: str, raw: bytes, model: str | None = None) -> None:
        self.raw = raw
        self.content_type = content_type
        self._boundary = (
            boundary_of(content_type)
            if model is None and content_type.lower().startswith("multipart/form-data")
            else None
        )
        self.payload: dict[str, Any] | None = None
        self._as_sent = model is not None
        self.model = self._find_model() if model is None else model

    @classmethod
    def as_sent(cls, content_type: str, raw: bytes, model: str) -> RequestBody:
        """A body that names no model (a request about an object), for a route chosen by
        `model`: passed to the backend as the client sent it."""
        return cls(content_type, raw, model)

    def _find_model(self) -> str:
        if self._boundary is not None:
            model, _ = replace_model_field(self.raw, self._boundary, None)
            if model is None:
                raise missing_model()
            return model
        if not self.raw.strip():
            raise missing_model()
        payload = _json_object(self.raw)
        model = payload.get("model")
        if model is None:
            raise missing_model()
        if not isinstance(model, str) or not model:
            raise APIError.bad_request(
                "'model' must be a non-empty string.", code="invalid_model", param="model"
            )
        self.payload = payload
        return model

    @property
    def wants_usage(self) -> bool:
        """A stream whose client did not ask for usage: the gateway asks for it (token counts
        for logs and metrics) and removes it from what the client sees."""
        if self.payload is None or self.payload.get("stream") is not True:
            return False
        options = self.payload.get("stream_options")
        return options is None or (isinstance(options, dict) and not options.get("include_usage"))

    def for_hop(self, hop: Hop, ask_usage: bool) -> bytes:
        """The body as this backend gets it: its model name (and `stream_options` when the
        gateway asks for usage). Only the model's bytes change (and stream_options is added)
        where that is provably what re-encoding would give; re-encoding is for the rest."""
        if self._as_sent:
            return self.raw
        if self._boundary is not None:
            return replace_model_field(self.raw, self._boundary, hop.upstream_model)[1]
        assert self.payload is not None
        if not ask_usage and hop.upstream_model == self.model:
            return self.raw
        if ask_usage:
            return self._asking_usage(hop.upstream_model)
        spliced = splice_models(
            self.raw, hop.upstream_model, {**self.payload, "model": hop.upstream_model}, 1
        )
        if spliced is not None:
            return spliced
        return dumps({**json.loads(self.raw), "model": hop.upstream_model})

    def _asking_usage(self, upstream_model: str) -> bytes:
        assert self.payload is not None
        if "stream_options" not in self.payload:
            expected = {
                **self.payload,
                "model": upstream_model,
                "stream_options": {"include_usage": True},
            }
            spliced = splice_models(self.raw, upstream_model, expected, 1, _INCLUDE_USAGE_MEMBER)
            if spliced is not None:
                return spliced
        exact = json.loads(self.raw)
        options = {**(exact.get("stream_options") or {}), "include_usage": True}
        return dumps({**exact, "model": upstream_model, "stream_options": options})


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        payload = loads(raw)
    except RecursionError:
        raise APIError.bad_request(
            "The JSON body is nested too deeply.", code="invalid_json"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError.bad_request(
            f"We could not parse the JSON body of your request ({exc}). "
            "The body must be a JSON object.",
            code="invalid_json",
        ) from None
    if not isinstance(payload, dict):
        raise APIError.bad_request("The request body must be a JSON object.", code="invalid_json")
    return payload


def missing_model() -> APIError:
    return APIError.bad_request(
        "You must provide a model parameter: the gateway routes each request by its 'model'.",
        code="missing_model",
        param="model",
    )

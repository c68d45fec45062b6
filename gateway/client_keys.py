"""Client keys: who is calling (constant-time key check) and which models they may use."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web

from gateway.config import ClientKey
from wire.errors import INVALID_REQUEST, APIError
from wire.headers import bearer_token


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated client key, as the request path needs it."""

    name: str
    models: tuple[str, ...]
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None

    def may_use(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


class KeyRing:
    """The configured keys, held only as SHA-256 digests."""

    def __init__(self, keys: Iterable[ClientKey]) -> None:
        self._entries: list[tuple[bytes, Caller]] = []
        for key in keys:
            digest = (
                bytes.fromhex(key.key.removeprefix("sha256:"))
                if key.key.startswith("sha256:")
                else hashlib.sha256(key.key.encode()).digest()
            )
            caller = Caller(key.name, tuple(key.models), key.rpm, key.tpm, key.max_concurrent)
            self._entries.append((digest, caller))

    def authenticate(self, request: web.Request) -> Caller | None:
        """The caller, or None when no keys are configured; 401 for a missing or wrong key."""
        if not self._entries:
            return None
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            raise APIError.unauthorized(
                "You didn't provide an API key. Send 'Authorization: Bearer <key>'.",
                code="missing_api_key",
                type_=INVALID_REQUEST,
            )
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        # Every entry is compared, in constant time, whatever matches first.
        for digest, caller in self._entries:
            if hmac.compare_digest(presented, digest):
                found = caller
        if found is None:
            raise APIError.unauthorized(
                "Incorrect API key provided.", code="invalid_api_key", type_=INVALID_REQUEST
            )
        return found


def authorize(caller: Caller | None, model: str) -> None:
    if caller is not None and not caller.may_use(model):
        raise APIError.forbidden(
            f"The key '{caller.name}' may not use the model '{model}'.",
            code="model_not_allowed",
            param="model",
        )

"""Gateway configs several test files share."""

from __future__ import annotations

from typing import Any

from tests.gateway.backend import FakeBackend

KEY = "sk-live-0123456789abcdef"


def multi(*urls: str, **extra: Any) -> dict[str, Any]:
    """One model `m` served by several backends."""
    return {"endpoints": {"m": {"backends": [{"url": u} for u in urls], **extra}}}


def config(backend: FakeBackend, **extra: Any) -> dict[str, Any]:
    """One model `llama` whose backend has a key, a renamed model and a secret header."""
    return {
        "endpoints": {
            "llama": {
                "url": backend.url,
                "displayName": "Llama",
                "apiKey": KEY,
                "actualModelName": "real",
                "headers": {"X-Backend-Token": "tok-9876543210-secret"},
                **extra,
            }
        }
    }

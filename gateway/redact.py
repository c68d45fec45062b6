"""The one choke point for secrets: masking for display, redaction of logs and error bodies."""

from __future__ import annotations

import re
from collections.abc import Iterable

# What a JSON encoder writes as an escape inside a string (orjson and json alike).
_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f\x7f-\U0010ffff]')


def mask(secret: str | None) -> str | None:
    """`sk-...abcd`: enough to tell keys apart, never enough to use one."""
    if not secret:
        return secret
    if len(secret) < 12:
        return "***"
    return f"{secret[:3]}...{secret[-4:]}"


class Redactor:
    """Replaces every known secret with its mask. Secrets are only ever added, so a key
    removed by a reload stays redacted in any log line still referring to it."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._ordered: list[str] = []
        # Every secret is written in a JSON string exactly as it is (see logs.JsonLineHandler).
        self.json_verbatim = True
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        # Short values would mask ordinary words; real keys are long.
        new = {s for s in secrets if s and len(s) >= 6} - self._secrets
        if new:
            self._secrets |= new
            # Longest first, so a key that contains another is masked whole.
            self._ordered = sorted(self._secrets, key=len, reverse=True)
            self.json_verbatim = not any(_JSON_ESCAPED.search(s) for s in self._secrets)

    def redact(self, text: str) -> str:
        for secret in self._ordered:
            if secret in text:
                text = text.replace(secret, mask(secret) or "")
        return text

    def redact_bytes(self, data: bytes) -> bytes:
        for secret in self._ordered:
            raw = secret.encode()
            if raw in data:
                data = data.replace(raw, (mask(secret) or "").encode())
        return data

"""Approximate prefix index: which backend last saw which request prefix, so a request can go
where its KV cache already is. Built from the gateway's own routing history, as llm-d's
chained block hashes are (the engines' caches themselves are not visible from here)."""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from itertools import accumulate, repeat
from operator import add
from typing import Any

CHARS_PER_TOKEN = 4  # the usual estimate for English text and code; the index is approximate
FINE_BLOCK = 64  # characters: ~16 tokens, vLLM's default block size
FINE_UNTIL = 1024
# Past FINE_UNTIL a block is an eighth of the prefix before it (rounded to FINE_BLOCK): the
# matched length is still known to within ~12%, and a 32k-character conversation costs ~45
# hashes instead of 500 (each costs ~0.5 us in Python here, and a decision must stay <= 50 us).
GROWTH = 8
DEFAULT_CACHE_TOKENS = 262_144  # a backend that says nothing: ~a 24 GB GPU's KV for an 8B model
SLACK = 0.25  # a part may grow this far past its capacity before the oldest entries go


def _boundaries(limit: int) -> tuple[int, ...]:
    out = [0]
    while out[-1] < limit:
        p = out[-1]
        step = (
            FINE_BLOCK
            if p < FINE_UNTIL
            else max(FINE_BLOCK, p // GROWTH // FINE_BLOCK * FINE_BLOCK)
        )
        out.append(p + step)
    return tuple(out)


# Fixed absolute positions (independent of a request's length), so prefixes line up.
BOUNDARIES = _boundaries(1 << 28)


def request_text(body: Mapping[str, Any]) -> str | None:
    """The request as the engine will see it, flattened: the `tools` definitions, then every
    message in order (role and text, text parts of multimodal content), or the `prompt`.
    None when there is nothing to index (embeddings, odd bodies)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        tools = body.get("tools")
        if tools:
            parts.append(_compact(tools))
        for message in messages:
            if type(message) is not dict:
                continue
            content = message.get("content")
            # The common case inline (a plain text message): a decision must stay <= 50 us.
            if type(content) is str and "tool_calls" not in message:
                role = message.get("role")
                parts.append(_ROLES.get(role) or f"\x1e{role}\x1f")
                parts.append(content)
            else:
                _message_text(message, parts)
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\x1e".join(prompt)
    return None


_ROLES = {r: f"\x1e{r}\x1f" for r in ("system", "developer", "user", "assistant", "tool")}


def _message_text(message: dict[str, Any], parts: list[str]) -> None:
    parts.append(f"\x1e{message.get('role', '')}\x1f")
    content = message.get("content")
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                # Other parts (images, audio) take their place without their bytes.
                parts.append(text if isinstance(text, str) else f"\x1d{part.get('type')}")
    calls = message.get("tool_calls")
    if calls:
        parts.append(_compact(calls))


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


_MASK = (1 << 60) - 1


def block_hashes(text: str, seed: str) -> list[int]:
    """One hash per whole block, each standing for the whole prefix up to its block's end
    (the sum of position-salted block hashes: chained, and computed without a Python loop).
    Seeded with the model, so two models' prefixes never meet. A partial last block is left
    out, as engines cache whole blocks only."""
    k = bisect_right(BOUNDARIES, len(text)) - 1
    starts = BOUNDARIES[:k]
    blocks = map(text.__getitem__, map(slice, starts, BOUNDARIES[1 : k + 1]))
    salted = map(hash, zip(starts, blocks, strict=True))
    chained = accumulate(salted, add, initial=hash(seed))
    next(chained)
    # 60 bits: a Python int below 2**60 takes 32 bytes, a 64-bit one 36 to 40.
    return list(map(_MASK.__and__, chained))


def block_chars(count: int) -> int:
    """How many characters the first `count` blocks cover."""
    return BOUNDARIES[count]


class BackendPart:
    """One backend's share of the index: an LRU of prefix hashes, bounded by its cache size
    in tokens, each entry weighing its block's tokens. Eviction takes the least recently
    used first, as vLLM's own cache does."""

    __slots__ = ("_clock", "_seen", "_tokens", "capacity_tokens")

    def __init__(self, capacity_tokens: int = DEFAULT_CACHE_TOKENS) -> None:
        self.capacity_tokens = capacity_tokens
        self._seen: dict[int, int] = {}  # hash -> recency (larger is more recent)
        self._tokens = 0
        self._clock = 0

    def __len__(self) -> int:
        return len(self._seen)

    @property
    def tokens(self) -> int:
        return self._tokens

    def matched(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` this backend holds (binary search: a part
        holds prefixes, so if block i is held so are the ones before it, nearly always)."""
        seen = self._seen
        if not seen or not hashes or hashes[0] not in seen:
            return 0
        lo, hi = 1, len(hashes)  # blocks [0, lo) held; find the first one that is not
        while lo < hi:
            mid = (lo + hi) // 2
            if hashes[mid] in seen:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def add(self, hashes: Sequence[int]) -> None:
        """The backend got a request with these blocks: all of them are now in its cache."""
        n = len(hashes)
        if not n:
            return
        seen = self._seen
        before = len(seen)
        # One recency for the whole request, one int object shared by all its entries (28
        # bytes an entry saved). A prefix's shallow blocks are touched by every request that
        # extends it, so they stay at least as recent as its deep ones: eviction takes the
        # tails first, and what stays is still a prefix.
        self._clock += 1
        seen.update(zip(hashes, repeat(self._clock)))
        added = len(seen) - before
        if added:
            # The new entries are the deepest ones (what it held already is a prefix).
            self._tokens += _tokens_between(n - added, n)
            if self._tokens > self.capacity_tokens * (1 + SLACK):
                self._evict()

    def clear(self) -> None:
        self._seen.clear()
        self._tokens = 0

    def _evict(self) -> None:
        """Down to the capacity, oldest first, in one pass (amortised over SLACK x capacity of
        insertions; each entry's weight is taken as the average block's)."""
        seen = self._seen
        keep = max(0, int(len(seen) * self.capacity_tokens / max(1, self._tokens)))
        if keep == 0:
            self.clear()
            return
        # Entries share their request's recency: the request at the cutoff goes whole.
        cutoff = sorted(seen.values())[len(seen) - keep]
        self._seen = {h: r for h, r in seen.items() if r > cutoff}
        self._tokens = self._tokens * len(self._seen) // max(1, len(seen))


def _tokens_between(first: int, end: int) -> int:
    return (BOUNDARIES[end] - BOUNDARIES[first]) // CHARS_PER_TOKEN


class PrefixIndex:
    """One route's index: a part per backend (by `Target.key`)."""

    def __init__(self) -> None:
        self.parts: dict[str, BackendPart] = {}

    def part(self, key: str, capacity_tokens: int) -> BackendPart:
        part = self.parts.get(key)
        if part is None:
            part = self.parts[key] = BackendPart(capacity_tokens)
        elif part.capacity_tokens != capacity_tokens:
            part.capacity_tokens = capacity_tokens
        return part

    def retain(self, keys: Iterable[str]) -> None:
        """After a reload: parts of backends still configured stay, the others go."""
        keep = set(keys)
        for key in list(self.parts):
            if key not in keep:
                del self.parts[key]

    def drop(self, key: str) -> None:
        part = self.parts.get(key)
        if part is not None and len(part):
            part.clear()

"""Token ids to text as they arrive: multi-byte safe, and stop strings that never leak."""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    A character can span several byte-level tokens; until its last byte arrives the decoder
    yields U+FFFD, so text is only released once it no longer ends in one. Decoding a small
    window (from a few tokens back) rather than the whole sequence keeps each step O(1),
    and starting the window early keeps context-dependent decoders (leading spaces in
    SentencePiece) right.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._tokens: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens before this are already released as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False
        )

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the text they complete (possibly empty)."""
        self._tokens.extend(token_ids)
        prefix_text = self._decode(self._tokens[self._prefix : self._read])
        full_text = self._decode(self._tokens[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            delta = full_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._tokens)
            return delta
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held back, incomplete characters included."""
        prefix_text = self._decode(self._tokens[self._prefix : self._read])
        full_text = self._decode(self._tokens[self._prefix :])
        self._prefix = self._read = len(self._tokens)
        return full_text[len(prefix_text) :]


class StopFilter:
    """Holds back just enough text that a stop string split across deltas is never sent."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add text; return what may be sent now. After a stop matches, returns nothing more."""
        if self.stopped:
            return ""
        self._pending += text
        # Text already released cannot start a match (the hold is one shorter than the
        # longest stop), so searching the pending text alone is enough.
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = min(self._hold, len(self._pending))
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return out

    def flush(self) -> str:
        """At the end of generation without a match: release the held text."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

"""Incremental, UTF-8-safe, stop-string-aware detokenization of one generation.

GPT-2's byte-level BPE can split one character over several tokens, so bytes go through an
incremental UTF-8 decoder that holds an incomplete character back until it is complete (bytes
that can never form a character become U+FFFD, exactly as a one-shot decode would). Text that
could still be the beginning of a stop string is held back too, until it is known not to be
one. The deltas returned, concatenated, equal the final text exactly.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DetokenizerUpdate:
    delta: str  # new text safe to show now
    stop: str | None = None  # the stop string that matched; the generation is over


class IncrementalDetokenizer:
    def __init__(
        self,
        token_bytes: Sequence[bytes],
        skip_ids: frozenset[int] = frozenset(),
        stop: Sequence[str] = (),
        include_stop_in_output: bool = False,
    ) -> None:
        self._token_bytes = token_bytes
        self._skip_ids = skip_ids
        self._stops = tuple(stop)
        self._stop_first_chars = frozenset(s[0] for s in self._stops)
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        self._include_stop = include_stop_in_output
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""  # everything decoded so far
        self._emitted = 0  # chars of _text already returned as deltas
        self._final: str | None = None  # set once finished (stop string or flush)

    @property
    def text(self) -> str:
        """The output text: final once finished, the emitted part before that."""
        return self._final if self._final is not None else self._text[: self._emitted]

    def add(self, token_id: int, check_stops: bool = True) -> DetokenizerUpdate:
        """Feed one generated token; return the delta that is safe to emit now."""
        if self._final is not None:
            raise RuntimeError("detokenizer already finished")
        if token_id in self._skip_ids:
            return DetokenizerUpdate("")
        old_len = len(self._text)
        self._text += self._decoder.decode(self._token_bytes[token_id])
        if check_stops and self._stops:
            match = self._find_stop(old_len)
            if match is not None:
                start, stop = match
                end = start + len(stop) if self._include_stop else start
                return DetokenizerUpdate(self._finish(self._text[:end]), stop)
        safe_end = self._hold_back_from() if check_stops else len(self._text)
        delta = self._text[self._emitted : safe_end]
        self._emitted = safe_end
        return DetokenizerUpdate(delta)

    def flush(self) -> str:
        """The generation ended for another reason: release everything held back."""
        if self._final is not None:
            return ""
        return self._finish(self._text + self._decoder.decode(b"", final=True))

    def _finish(self, final_text: str) -> str:
        delta = final_text[self._emitted :]
        self._final = final_text
        self._emitted = len(final_text)
        return delta

    def _find_stop(self, old_len: int) -> tuple[int, str] | None:
        """Earliest stop string that ends in the newly decoded text."""
        best: tuple[int, str] | None = None
        for stop in self._stops:
            at = self._text.find(stop, max(0, old_len - len(stop) + 1))
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        return best

    def _hold_back_from(self) -> int:
        """Index where a suffix starts that may yet grow into a stop string (or len(text))."""
        text = self._text
        for j in range(max(self._emitted, len(text) - self._max_stop_len + 1), len(text)):
            if text[j] in self._stop_first_chars:
                tail = text[j:]
                if any(s.startswith(tail) for s in self._stops):
                    return j
        return len(text)

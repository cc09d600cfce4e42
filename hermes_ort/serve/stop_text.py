"""The `stop` strings of a chat or completion request, found in generated text as it streams.

A stop string may arrive split over several pieces (tokens), so the tail that could still become
one is held back until the next piece tells; the text shown never contains a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopText:
    """Pieces of generated text in, text safe to show out: holds back a tail that could be the
    start of a stop string; when a stop string appears, the text before it is the last shown and
    `stopped` is True (the stop string itself is not returned, as OpenAI does). Of several stop
    strings the first to be complete wins, so the pieces' boundaries do not change the result."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("a stop string is empty")
        self.stops = tuple(stops)
        self.held = ""  # a tail of the text that is a proper prefix of some stop string
        self.stopped = False

    def add(self, piece: str) -> str:
        """The text that may be shown now ("" if none; always "" once stopped)."""
        if self.stopped:
            return ""
        text = self.held + piece
        # (end, start) of each stop string found: the first to end is the one a token-by-token
        # check would meet first, whatever the pieces (on a tie, the longer)
        found = [(i + len(s), i) for s in self.stops if (i := text.find(s)) >= 0]
        if found:
            self.stopped, self.held = True, ""
            return text[: min(found)[1]]
        keep = self._open_tail(text)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def finish(self) -> str:
        """The held-back tail, at the end of generation (no stop string came)."""
        tail, self.held = self.held, ""
        return tail

    def _open_tail(self, text: str) -> int:
        """The length of the longest tail of `text` that a stop string starts with (shorter than
        that stop string: a whole one would have been found)."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

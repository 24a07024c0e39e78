"""Stop strings: text is released as soon as it cannot be the start of one."""

from __future__ import annotations

from collections.abc import Sequence


class StopScanner:
    """Releases generated text as soon as it cannot be the start of a stop string.

    ``push`` returns the text that is safe to show now; text that might begin a stop
    string is held back until it is clear. Once a stop string appears, ``done`` is set
    and the text before it is returned; the stop string itself is never returned.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""
        self.done = False
        self.stop_length = 0  # characters of the stop string that ended the text

    def push(self, text: str) -> str:
        self.pending += text
        matches = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if matches:
            start = min(matches)[0]
            # A match is seen the moment it completes, so everything from `start` on is the stop string.
            out, self.stop_length = self.pending[:start], len(self.pending) - start
            self.done, self.pending = True, ""
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

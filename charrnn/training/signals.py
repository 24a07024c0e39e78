"""SIGINT / SIGTERM as a request to stop after the current step, so the last save always completes."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# After a signal, how long the processes wait for each other to agree to stop and save. torchrun
# SIGTERMs every worker when one dies, and kills them 30 s later: a dead or hung peer must not
# hold the survivors in a collective until then (or for the process group's 30 minutes).
SIGNAL_AGREE_SECONDS = 10.0


class StopSignal:
    """Turns SIGINT / SIGTERM into a request to stop after the current step.

    The handler only records the signal. The trainer reports it through its callbacks
    (``on_signal``) at the next safe point (a step's end, an evaluation's, a save's):
    a handler runs between any two bytecodes, and one that printed could meet the
    terminal in the middle of another write. A signal after the first is reported and
    ignored, so the save always completes.
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal: it decides the exit status
        self.received: list[int] = []  # every signal, in order (the handler only appends)
        self._reported = 0

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        self.received.append(signum)

    def unreported(self) -> list[tuple[int, bool]]:
        """The signals received since the last call, each as (signum, repeated): ``repeated``
        for every one after the first, which changes nothing."""
        start = self._reported
        new = self.received[start:]  # a signal landing after this slice waits for the next call
        self._reported = start + len(new)
        return [(signum, start + i > 0) for i, signum in enumerate(new)]

    @contextmanager
    def installed(self) -> Iterator["StopSignal"]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals can only be handled in the main thread
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

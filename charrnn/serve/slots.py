"""Generation slots, and the bridge between a generation's worker thread and the event loop.

A generation runs in a worker thread (sampling holds the GIL in short steps, the event
loop keeps answering). It tells the loop what happens as typed events, put on an
:class:`asyncio.Queue` from the thread: :class:`Ready` once the prompt is read, then per
choice its :class:`Piece` s and a :class:`Finished`, and :class:`Complete` at the end;
:class:`Failed` in place of the rest when something goes wrong. The loop sets the
generation's cancel event when its client leaves, and the worker stops at its next character.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

from ..errors import CharRNNError
from ..generation.constraints import ConstraintError
from ..generation.processors import TokenLogprob
from .protocol import RequestError
from .settings import ServeConfig

log = logging.getLogger("charrnn.serve")


# --- the events a worker sends ----------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The prompt is read: ``prompt_chars`` in all, ``cached_chars`` of them from the state cache;
    with ``echo`` and log-probabilities, the prompt's own (``prompt_logprobs``, its first None)."""

    prompt_chars: int
    cached_chars: int
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()


@dataclass(frozen=True)
class Piece:
    """Text of choice ``choice``, as sampled, and its characters' log-probabilities when asked for."""

    choice: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """Choice ``choice`` has ended, for ``reason`` (``"stop"``, ``"length"``)."""

    choice: int
    reason: str | None


@dataclass(frozen=True)
class Complete:
    """Every choice has ended: the answer is whole."""


@dataclass(frozen=True)
class Failed:
    """The generation stopped with ``error``; nothing follows."""

    error: BaseException


Event = Ready | Piece | Finished | Complete | Failed
Emit = Callable[[Event], None]


class ServerStopping(Exception):
    """The server began to shut down while a generation ran."""


def as_request_error(exc: BaseException) -> RequestError:
    """What a failed generation answers: the client's mistake a 400, the deadline a 504, shutdown a 503, a bug a 500
    (and one log line)."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, ServerStopping):
        return RequestError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), code="shutting_down")
    if isinstance(exc, ConstraintError):  # a constraint that needs a character the model never saw
        return RequestError(HTTPStatus.BAD_REQUEST, str(exc), exc.what, "invalid_constraint")
    if isinstance(exc, CharRNNError):  # a prompt the model cannot read: the client's to fix
        return RequestError(HTTPStatus.BAD_REQUEST, str(exc), "messages", "invalid_prompt")
    if isinstance(exc, TimeoutError):
        return RequestError(HTTPStatus.GATEWAY_TIMEOUT, f"{exc} went past this server's request deadline", code="timeout")
    log.error("internal error in a generation: %s: %s", type(exc).__name__, exc)
    return RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error: see the server log", code="internal_error")


def coalesce(events: list[Event]) -> list[Event]:
    """Adjacent pieces of one choice as one piece: a slow reader gets fewer, larger chunks."""
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, Piece) and isinstance(last, Piece) and last.choice == event.choice:
            out[-1] = Piece(event.choice, last.text + event.text, last.logprobs + event.logprobs)
        else:
            out.append(event)
    return out


# --- the slots ----------------------------------------------------------------------------------------


class GenerationSlots:
    """Generation slots: ``max_concurrent`` run, ``max_queue`` wait; counted on the event loop.

    A request that finds every slot taken and the queue full gets a 429 at once; one that
    waits longer than ``queue_timeout`` (or past its deadline) gets a 503.
    """

    def __init__(self, config: ServeConfig):
        self.config = config
        self.running = self.waiting = 0
        self._semaphore: asyncio.Semaphore | None = None

    async def acquire(self, deadline: float) -> None:
        """Take a slot, waiting in the queue if there is room in it."""
        if self._semaphore is None:  # made on the loop that serves
            self._semaphore = asyncio.Semaphore(self.config.max_concurrent)
        if self.running >= self.config.max_concurrent and self.waiting >= self.config.max_queue:
            raise RequestError(
                HTTPStatus.TOO_MANY_REQUESTS,
                f"{self.running} generations are running and {self.waiting} waiting, the most this server queues: "
                "try again shortly",
                code="server_busy",
            )
        self.waiting += 1
        try:
            wait = min(self.config.queue_timeout, max(0.0, deadline - time.monotonic()))
            await asyncio.wait_for(self._semaphore.acquire(), wait)
        except asyncio.TimeoutError:
            raise RequestError(
                HTTPStatus.SERVICE_UNAVAILABLE, f"no generation slot came free within {wait:g} s: try again", code="server_busy"
            ) from None
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        """Give a slot back (on the event loop)."""
        self.running -= 1
        assert self._semaphore is not None
        self._semaphore.release()


# --- the bridge ---------------------------------------------------------------------------------------


class Generation:
    """One request's generation running in a worker thread: its events as the loop reads them.

    Made by :meth:`start`; :meth:`next` is the next event, :meth:`waiting` those already
    there, :meth:`stop` tells the worker to stop (idempotent: call it when done, whatever happened).
    """

    def __init__(self, queue: asyncio.Queue[Event], cancel: threading.Event, deadline: float):
        self._queue, self._cancel, self.deadline = queue, cancel, deadline

    @classmethod
    async def start(
        cls,
        slots: GenerationSlots,
        pool: concurrent.futures.Executor,
        work: Callable[[Emit, threading.Event], None],
        deadline: float,
    ) -> tuple[Generation, Ready]:
        """Wait for a slot, run ``work(emit, cancel)`` in ``pool``, and wait until its prompt is read.

        The slot is given back when ``work`` returns, however it ends. Raises the
        RequestError of a generation that fails before it is ready.
        """
        await slots.acquire(deadline)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        cancel = threading.Event()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop has closed (the server is stopping): nobody to tell
                cancel.set()

        def run() -> None:
            try:
                work(emit, cancel)
            finally:
                try:
                    loop.call_soon_threadsafe(slots.release)
                except RuntimeError:  # the loop has closed: no slot to give back
                    pass

        try:
            pool.submit(run)
        except BaseException:
            slots.release()
            raise
        generation = cls(queue, cancel, deadline)
        try:
            first = await generation.next()
        except TimeoutError:
            generation.stop()
            raise as_request_error(TimeoutError("reading the prompt")) from None
        if isinstance(first, Failed):
            raise as_request_error(first.error)
        assert isinstance(first, Ready), first
        return generation, first

    async def next(self) -> Event:
        """The worker's next event; TimeoutError past the deadline (with a second's grace for the worker's own check)."""
        try:
            return await asyncio.wait_for(self._queue.get(), max(0.0, self.deadline - time.monotonic()) + 1.0)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
            raise TimeoutError from None

    def waiting(self) -> list[Event]:
        """The events already in, without waiting."""
        events = []
        while not self._queue.empty():
            events.append(self._queue.get_nowait())
        return events

    def stop(self) -> None:
        """Tell the worker to stop at its next character (the client left, or the answer is done)."""
        self._cancel.set()

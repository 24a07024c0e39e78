"""An OpenAI-compatible model server: Starlette on uvicorn (the ``serve`` extra).

Endpoints (see ``charrnn.serve.protocol`` for the fields each one honours, ignores or refuses):

``GET /v1/models``, ``GET /v1/models/{id}``
    the one model this server holds.
``POST /v1/completions``, ``POST /v1/chat/completions``
    OpenAI's request and answer shapes; ``"stream": true`` answers with server-sent
    events of ``text_completion`` / ``chat.completion.chunk`` objects, then
    ``data: [DONE]``. ``max_tokens`` and ``usage`` count characters.
``GET /health``
    the model, the limits, the defaults, the state cache and the load.
``GET /``
    a chat page (``chat.html``, self-contained) that streams from ``/v1/chat/completions``.

``POST /complete``, the server's own protocol before this one, is retired: it answers
410 with the request to make instead.

How the limits hold (uvicorn parses HTTP, keeps connections alive and notices clients
that leave; the rest is in ``charrnn.serve.http`` and ``charrnn.serve.slots``):

- Generations run in a pool of ``max_concurrent`` threads. A request that finds them
  busy waits (at most ``max_queue`` wait, for at most ``queue_timeout`` s); beyond that
  it gets a 429, after the wait a 503, both OpenAI error objects.
- Every request has one deadline, ``request_timeout`` s after its first byte: headers
  (checked by the protocol class, as uvicorn has no header timeout), body, wait and
  reply. A client that sends a byte every few seconds is answered 408 and dropped.
- A body is read with its limit enforced while reading (413), whatever Content-Length says.
- A client that leaves mid-stream stops its generation at the next character.
- Every answer, for every method and every error, is JSON with its status (but ``GET /``,
  the page); a handler's unexpected exception is a 500 JSON answer and one log line.

:class:`Server` is the app; :func:`listen` and :func:`uvicorn_server` start it
(``charrnn.cli.serve`` in a process of its own, ``charrnn.serve.testing`` in a thread).
"""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..config import MAX_SEED, SAMPLE_DEFAULTS
from ..generation.chat import ChatTemplate, model_fingerprint
from ..generation.sampler import Context, Sampler
from .answers import Answer, sse
from .http import Handler, bears_api_key, check_api_key, json_app, json_response, protocol_class, read_body, request_deadline
from .jobs import Job, chat_job, completion_job
from .protocol import MAX_STOP_CHARS, MAX_STOPS, RequestError, parse_body
from .settings import ServeConfig
from .slots import (
    Complete,
    Emit,
    Event,
    Failed,
    Finished,
    Generation,
    GenerationSlots,
    Piece,
    Ready,
    ServerStopping,
    as_request_error,
    coalesce,
)
from .state_cache import StateCache, piece_keys


class Server:
    """One loaded model behind the OpenAI protocol: the Starlette app (:attr:`app`) and its state."""

    def __init__(self, sampler: Sampler, config: ServeConfig | None = None, template: ChatTemplate | None = None):
        self.sampler = sampler
        self.config = config or ServeConfig()
        self.template = template or ChatTemplate()
        self.template.check_vocabulary(sampler.tokenizer)  # refused at start-up, not in every request
        self.model_id = self.config.model_name or "charrnn"
        self.created = int(time.time())
        self.fingerprint = "charrnn-" + model_fingerprint(sampler)[:16]
        self.cache = StateCache(self.config.cache_entries, self.config.cache_bytes)
        self.slots = GenerationSlots(self.config)
        self.pool = concurrent.futures.ThreadPoolExecutor(self.config.max_concurrent, thread_name_prefix="charrnn-gen")
        self.stopping = threading.Event()  # set when the server shuts down: generations end at their next piece
        self.page = resources.files(__package__).joinpath("chat.html").read_bytes()
        routes: dict[str, dict[str, Handler]] = {
            "/": {"GET": self.chat_page},
            "/health": {"GET": self.health},
            "/v1/models": {"GET": self.models},
            "/v1/models/{model_id:path}": {"GET": self.one_model},
            "/v1/completions": {"POST": self.completions},
            "/v1/chat/completions": {"POST": self.chat_completions},
            "/complete": {"POST": self.retired},
        }
        self.app = json_app(routes, self.config)

    # -- the endpoints ---------------------------------------------------------------------
    async def chat_page(self, request: Request) -> Response:
        """``GET /``: the chat page."""
        # The page fetches nothing from anywhere else, and the policy makes sure of it.
        # frame-ancestors: no other site may show the page in a frame (and so trick a click on it).
        policy = (
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src data:; frame-ancestors 'none'"
        )
        headers = {"Content-Security-Policy": policy, "X-Frame-Options": "DENY"}
        return Response(self.page, media_type="text/html; charset=utf-8", headers=headers)

    async def health(self, request: Request) -> Response:
        """``GET /health``: the model, the template, the limits, the defaults (no key needed), and with the key,
        if the server has one, the cache and the load (which say how busy it is and what was asked of it)."""
        config = self.config
        limits = {
            "max_length": config.max_length,
            "max_n": config.max_n,
            "max_body_bytes": config.max_body_bytes,
            "max_concurrent": config.max_concurrent,
            "max_queue": config.max_queue,
            "request_timeout": config.request_timeout,
            "max_stops": MAX_STOPS,
            "max_stop_chars": MAX_STOP_CHARS,
        }
        defaults = {
            "max_tokens": config.default_length,
            **{k: getattr(SAMPLE_DEFAULTS, k) for k in ("temperature", "top_k", "top_p")},
        }
        return json_response(
            HTTPStatus.OK,
            {
                "status": "ok",
                "model": {"id": self.model_id, **self.sampler.model.config.to_dict()},
                "template": self.template.to_dict(),
                "limits": limits,
                "defaults": defaults,
                "auth": config.api_key is not None,
                **(self._counters() if bears_api_key(request, config.api_key) else {}),
            },
        )

    def _counters(self) -> dict[str, Any]:
        return {"cache": self.cache.stats(), "load": {"running": self.slots.running, "waiting": self.slots.waiting}}

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "charrnn"}

    async def models(self, request: Request) -> Response:
        """``GET /v1/models``: the one model."""
        check_api_key(request, self.config.api_key)
        return json_response(HTTPStatus.OK, {"object": "list", "data": [self._model_card()]})

    async def one_model(self, request: Request) -> Response:
        """``GET /v1/models/{id}``: the model, if that is its id."""
        check_api_key(request, self.config.api_key)
        if request.path_params["model_id"] != self.model_id:
            raise RequestError(
                HTTPStatus.NOT_FOUND, f"this server holds one model, {self.model_id!r}", "model", "model_not_found"
            )
        return json_response(HTTPStatus.OK, self._model_card())

    async def retired(self, request: Request) -> Response:
        """``POST /complete``: 410, with the request to make instead."""
        raise RequestError(
            HTTPStatus.GONE,
            "POST /complete was retired: use POST /v1/completions (the OpenAI protocol; max_tokens for length)",
            code="retired",
        )

    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``."""
        tokenizer, limit = self.sampler.tokenizer, self.sampler.max_prompt_chars
        return await self._generate(request, lambda body: completion_job(parse_body(body), self.config, tokenizer, limit))

    async def chat_completions(self, request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        tokenizer, template, limit = self.sampler.tokenizer, self.template, self.sampler.max_prompt_chars
        return await self._generate(request, lambda body: chat_job(parse_body(body), self.config, tokenizer, template, limit))

    async def _generate(self, request: Request, job_of: Callable[[bytes], Job]) -> Response:
        check_api_key(request, self.config.api_key)
        deadline = request_deadline(request, self.config.request_timeout)
        body = await read_body(request, self.config, deadline)
        # Parsed and checked in a worker thread: a large body never stalls the event loop.
        job = await anyio.to_thread.run_sync(job_of, body)
        generation, ready = await Generation.start(
            self.slots, self.pool, lambda emit, cancel: self.generate(job, emit, cancel, deadline), deadline
        )
        answer = Answer(
            job,
            self.model_id,
            self.fingerprint,
            prompt_chars=ready.prompt_chars,
            cached_chars=ready.cached_chars,
            prompt_logprobs=ready.prompt_logprobs,
        )
        if job.stream:
            return StreamingResponse(
                self._stream(generation, answer),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await self._whole(generation, answer)

    # -- generation, in a worker thread ---------------------------------------------------------
    def context_for(self, pieces: list[str], go_on: Callable[[], None] = lambda: None) -> tuple[Context, int, int]:
        """The context after ``pieces``, from the longest prefix in the state cache; with the
        characters read in all and those a cached state stood for. Runs in a worker thread;
        ``go_on()`` is called between pieces (and raises to stop)."""
        keys = piece_keys(pieces)
        context, start = None, 0
        for i in range(len(keys) - 1, -1, -1):
            context = self.cache.get(keys[i])
            if context is not None:
                start = i + 1
                break
        self.cache.count(start > 0)
        for piece in pieces[start:]:  # the same reads, one per piece, as a miss makes: a hit changes nothing
            go_on()
            # No warning: the answer tells its client of unknown characters (a warning per request would pile up).
            context = self.sampler.read(piece, context, warn=False)
        if context is None:  # nothing to read: start as a prompt-less sample does
            context = self.sampler.read("")
        elif start < len(keys):
            self.cache.put(keys[-1], context)
        total = sum(map(len, pieces))
        return context, total, sum(map(len, pieces[:start]))

    def generate(self, job: Job, emit: Emit, cancel: threading.Event, deadline: float) -> None:
        """The generation of one request, in a worker thread: its events (see ``charrnn.serve.slots``)."""

        def go_on() -> None:
            """Between two pieces read or written: stop for a client that left, the server's shutdown, the deadline."""
            if cancel.is_set():
                raise _ClientLeft
            if self.stopping.is_set():
                raise ServerStopping("the server is shutting down: send the request again once it is back")
            if time.monotonic() > deadline:
                raise TimeoutError("the request")

        listed = job.logprobs is not None
        try:
            context, total, cached = self.context_for(job.pieces, go_on)
            echoed = self.sampler.prompt_logprobs(job.echo, job.logprobs or 0) if job.echo and listed else []
            emit(Ready(total, cached, tuple(echoed)))
            ranked = job.best_of > job.n
            if ranked:
                self._best_of(job, context, emit, go_on)
            for i, seed in enumerate(() if ranked else job.seeds()):
                reply = self.sampler.continue_from(context, job.sample, keep_context=False, seed=seed)
                shown = 0
                try:
                    for piece in reply:
                        go_on()
                        records = reply.logprobs[shown:] if listed else []
                        shown += len(records)
                        emit(Piece(i, piece, tuple(records)))
                finally:
                    reply.close()  # a client that left stops the generation here
                emit(Finished(i, reply.finish_reason))
            emit(Complete())
        except _ClientLeft:
            pass  # nobody to answer
        except BaseException as exc:  # handed to the event loop, which answers it
            emit(Failed(exc))

    def _best_of(self, job: Job, context: Context, emit: Emit, go_on: Callable[[], None]) -> None:
        """``best_of`` samples (seed, seed + 1, ...), of which the ``n`` of highest mean log-probability
        are the answer's choices, best first."""
        samples = []
        for j in range(job.best_of):
            seed = (job.seed + j) & MAX_SEED
            reply = self.sampler.continue_from(context, job.sample, keep_context=False, seed=seed)
            try:
                text = "".join(piece for piece in reply if go_on() is None)
            finally:
                reply.close()
            logprobs = reply.logprobs
            mean = sum(r.logprob for r in logprobs) / len(logprobs) if logprobs else float("-inf")
            samples.append((mean, -j, text, tuple(logprobs), reply.finish_reason))
        for i, (_, _, text, logprobs, reason) in enumerate(sorted(samples, reverse=True)[: job.n]):
            emit(Piece(i, text, logprobs if job.logprobs is not None else ()))
            emit(Finished(i, reason))

    # -- answers, on the event loop ---------------------------------------------------------------
    async def _whole(self, generation: Generation, answer: Answer) -> Response:
        """The answer as one JSON body, once every choice has ended."""
        n = answer.job.n
        texts, reasons, logprobs = [""] * n, [None] * n, [[] for _ in range(n)]
        try:
            while not isinstance(event := await generation.next(), Complete):
                match event:
                    case Piece(choice=i, text=text, logprobs=records):
                        texts[i] += text
                        logprobs[i] += records
                    case Finished(choice=i, reason=reason):
                        reasons[i] = reason
                    case Failed(error=error):
                        raise as_request_error(error)
        except TimeoutError:
            raise as_request_error(TimeoutError("the reply")) from None
        finally:
            generation.stop()
        return json_response(HTTPStatus.OK, answer.body(texts, reasons, logprobs))

    async def _stream(self, generation: Generation, answer: Answer) -> AsyncIterator[bytes]:
        """The stream: a first chunk per choice, the pieces (those waiting, joined into one chunk), the ends, [DONE]."""
        stream = _Stream(answer)
        try:
            while not stream.over:
                try:
                    events: list[Event] = [await generation.next()]
                except TimeoutError:
                    events = [Failed(TimeoutError("the stream"))]
                yield stream.write(coalesce(events + generation.waiting()))
        finally:
            generation.stop()  # the client left (or the stream ended): the worker stops at its next character

    # -- running ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the generation threads: those running end at their next piece, answering 503."""
        self.stopping.set()
        self.pool.shutdown(wait=False, cancel_futures=True)


class _ClientLeft(Exception):
    """A generation's client went away: it ends without an answer."""


class _Stream:
    """The server-sent events of one streamed answer, written as its events come."""

    def __init__(self, answer: Answer):
        self.answer = answer
        self.chat = answer.job.kind == "chat"
        self.written = 0  # characters, for the usage chunk
        self.streamed: dict[int, int] = {}  # characters per choice so far, for the completions' text offsets
        self.started: set[int] = set()  # the choices whose first chunk is out
        self.over = False

    def write(self, events: list[Event]) -> bytes:
        """The events' chunks, up to the end of the stream if it is among them."""
        out = []
        for event in events:
            match event:
                case Piece(choice=i, text=text, logprobs=records):
                    offset = self.streamed.get(i, 0)
                    out.append(sse(self.answer.chunk(i, text, first=self._first(i), logprobs=records, offset=offset)))
                    self.streamed[i] = offset + len(text)
                    self.written += len(text)
                case Finished(choice=i, reason=reason):
                    # A chat choice opens with its role, and an echoing completion with its prompt, even when empty.
                    if (self.chat or self.answer.job.echo) and i not in self.started:
                        out.append(sse(self.answer.chunk(i, "", first=self._first(i))))
                    out.append(sse(self.answer.chunk(i, None if self.chat else "", reason)))
                case Failed(error=error):
                    out.append(sse(as_request_error(error).body()))
                    self.over = True
                    break
                case Complete():
                    if self.answer.job.include_usage:
                        out.append(sse(self.answer.usage_chunk(self.written)))
                    out.append(sse("[DONE]"))
                    self.over = True
                    break
        return b"".join(out)

    def _first(self, choice: int) -> bool:
        first = choice not in self.started
        self.started.add(choice)
        return first


def model_id_for(path: str | Path) -> str:
    """The id a checkpoint is served as: its run folder's name (``best``/``last`` name the folder above)."""
    path = Path(path).resolve()
    return path.parent.name if path.name in ("best", "last") else path.name


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket (port 0: any free one); the backlog takes a burst of connections at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def uvicorn_server(server: Server) -> uvicorn.Server:
    """The uvicorn server that runs ``server.app`` with its limits (call ``run(sockets=[...])``)."""
    config = uvicorn.Config(
        server.app,
        http=protocol_class(server.config.request_timeout),
        ws="none",
        lifespan="off",
        access_log=not server.config.quiet,
        log_level="warning" if server.config.quiet else "info",
        timeout_keep_alive=5,
        timeout_graceful_shutdown=2,
        backlog=server.config.backlog,
        server_header=False,
    )
    return _Uvicorn(config, server)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, which tells running generations when it starts to shut down (Ctrl-C, SIGTERM):
    they answer 503 at their next piece, within the graceful-shutdown time, instead of running on."""

    def __init__(self, config: uvicorn.Config, server: Server):
        super().__init__(config)
        self.charrnn_server = server

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.charrnn_server.stopping.set()
        super().handle_exit(sig, frame)

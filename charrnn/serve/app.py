"""An OpenAI-compatible model server: Starlette on uvicorn (the ``serve`` extra).

Endpoints (see ``protocol`` for the fields each one honours, ignores or refuses):

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
that leave; the rest is here):

- Generations run in a pool of ``max_concurrent`` threads. A request that finds them
  busy waits (at most ``max_queue`` wait, for at most ``queue_timeout`` s); beyond that
  it gets a 429, after the wait a 503, both OpenAI error objects.
- Every request has one deadline, ``request_timeout`` s after its first byte: headers
  (checked by the protocol class below, as uvicorn has no header timeout), body, wait
  and reply. A client that sends a byte every few seconds is answered 408 and dropped.
- A body is read with its limit enforced while reading (413), whatever Content-Length says.
- A client that leaves mid-stream stops its generation at the next character.
- Every answer, for every method and every error, is JSON with its status (but ``GET /``,
  the page); a handler's unexpected exception is a 500 JSON answer and one log line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import h11
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import SAMPLE_DEFAULTS
from ..errors import CharRNNError
from ..generation.chat import ChatTemplate, model_fingerprint
from ..generation.sampler import Context, Sampler
from .protocol import (
    MAX_STOP_CHARS,
    MAX_STOPS,
    Answer,
    Job,
    RequestError,
    chat_job,
    completion_job,
    error_body,
    parse_body,
    sse,
)
from .settings import ServeConfig
from .state_cache import StateCache, piece_keys

log = logging.getLogger("charrnn.serve")
_STARTED = "charrnn_started"  # the request's first moment (monotonic), put in the scope's state by the protocol
Handler = Callable[[Request], Awaitable[Response]]


def json_response(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    # ensure_ascii: the body is valid UTF-8 whatever a client managed to put in an echoed string.
    body = json.dumps(payload, ensure_ascii=True) + "\n"
    return Response(body, status_code=int(status), headers=headers, media_type="application/json")


def error_response(exc: RequestError, headers: dict[str, str] | None = None) -> Response:
    if exc.status == HTTPStatus.REQUEST_TIMEOUT:  # a client too slow to finish its request gets no more time
        headers = {**(headers or {}), "Connection": "close"}
    return json_response(exc.status, exc.body(), headers)


# --- the protocol: a deadline for the headers, JSON for uvicorn's own refusals -------------------


def _raw_json(status: HTTPStatus, message: str) -> bytes:
    body = json.dumps(error_body(status, message)).encode() + b"\n"
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def protocol_class(request_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, with the start of each request's deadline and JSON refusals.

    uvicorn times out idle keep-alive connections, but not a request's headers arriving
    a byte at a time; here a connection whose request is not in within ``request_timeout``
    seconds of its start (or of the previous answer) gets a 408 and is closed. The
    moment is passed on in the request's scope, so the body and the reply share the deadline.
    """

    class DeadlineProtocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _since = 0.0

        def _arm(self) -> None:
            self._disarm()
            self._since = time.monotonic()
            self._timer = self.loop.call_later(request_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle and self.cycle is not None:  # a new request's headers are in
                self._disarm()
                self.cycle.scope.setdefault("state", {})[_STARTED] = self._since

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request (or the rest of an unread body) has its own deadline

        def _too_slow(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            # Headers still coming (or none yet): answer. The rest of an answered request's body: just close.
            if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                message = f"the request did not arrive within {request_timeout:g} s: send it at once"
                self.transport.write(_raw_json(HTTPStatus.REQUEST_TIMEOUT, message))
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self.transport.write(_raw_json(HTTPStatus.BAD_REQUEST, f"this is not a valid HTTP/1.1 request ({msg})"))
            self.transport.close()

    return DeadlineProtocol


class _AnyMethod(Route):
    """A route for every method, even unknown ones: the endpoint answers a wrong one with a JSON 405
    (Starlette's own 405 is plain text)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        return (Match.FULL if match == Match.PARTIAL else match), child

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


# --- the app ------------------------------------------------------------------------------------


class _Busy:
    """Generation slots: ``max_concurrent`` run, ``max_queue`` wait; counted on the event loop."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.running = self.waiting = 0
        self._semaphore: asyncio.Semaphore | None = None

    async def acquire(self, deadline: float) -> None:
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
        self.running -= 1
        assert self._semaphore is not None
        self._semaphore.release()


class Server:
    """One loaded model behind the OpenAI protocol: the Starlette app (:attr:`app`) and its state."""

    def __init__(self, sampler: Sampler, config: ServeConfig | None = None, template: ChatTemplate | None = None):
        self.sampler = sampler
        self.config = config or ServeConfig()
        self.template = template or ChatTemplate()
        unknown = sampler.tokenizer.unknown_chars("".join(self.template.to_dict().values()))
        if unknown:
            raise CharRNNError(
                f"the chat template uses characters the model never saw ({''.join(unknown)!r}): "
                "write its prefixes and separator with characters of the training corpus"
            )
        self.model_id = self.config.model_name or "charrnn"
        self.created = int(time.time())
        self.fingerprint = "charrnn-" + model_fingerprint(sampler)[:16]
        self.cache = StateCache(self.config.cache_entries, self.config.cache_bytes)
        self.busy = _Busy(self.config)
        self.pool = concurrent.futures.ThreadPoolExecutor(self.config.max_concurrent, thread_name_prefix="charrnn-gen")
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
        self.app = Starlette(
            routes=[_AnyMethod(path, self._endpoint(path, handlers)) for path, handlers in routes.items()]
            + [_AnyMethod("/{path:path}", self._not_found)]
        )

    # -- plumbing: methods, errors, CORS, the key --------------------------------------------
    def _endpoint(self, path: str, handlers: dict[str, Handler]) -> Handler:
        allowed = sorted({*handlers, "OPTIONS", *(["HEAD"] if "GET" in handlers else [])})

        async def endpoint(request: Request) -> Response:
            method = request.method
            if method == "OPTIONS":
                response = json_response(HTTPStatus.OK, {"path": path, "methods": allowed}, {"Allow": ", ".join(allowed)})
                if self._origin(request) is not None:
                    response.headers.update(
                        {
                            "Access-Control-Allow-Methods": ", ".join(allowed),
                            "Access-Control-Allow-Headers": "Authorization, Content-Type",
                            "Access-Control-Max-Age": "600",
                        }
                    )
            else:
                handler = handlers.get("GET" if method == "HEAD" else method)
                if handler is None:
                    message = f"{request.url.path} takes {' or '.join(sorted(handlers))}, not {method}"
                    exc = RequestError(HTTPStatus.METHOD_NOT_ALLOWED, message, code="method_not_allowed")
                    response = error_response(exc, {"Allow": ", ".join(allowed)})
                else:
                    response = await self._guarded(handler, request)
            origin = self._origin(request)
            if origin is not None:
                response.headers["Access-Control-Allow-Origin"] = origin
                response.headers["Vary"] = "Origin"
            return response

        return endpoint

    async def _guarded(self, handler: Handler, request: Request) -> Response:
        try:
            return await handler(request)
        except RequestError as exc:
            return error_response(exc)
        except ClientDisconnect:
            return json_response(HTTPStatus.BAD_REQUEST, error_body(HTTPStatus.BAD_REQUEST, "the client left"))
        except Exception as exc:  # never a dropped connection or a traceback to the client: one log line
            log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
            return json_response(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                error_body(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error: see the server log"),
            )

    async def _not_found(self, request: Request) -> Response:
        message = f"no {ascii(request.url.path)[1:-1]} here: use POST /v1/chat/completions, POST /v1/completions, GET /v1/models"
        return error_response(RequestError(HTTPStatus.NOT_FOUND, message, code="not_found"))

    def _origin(self, request: Request) -> str | None:
        origin = request.headers.get("origin")
        allowed = self.config.cors_origin
        if origin is None or not allowed:
            return None
        if "*" in allowed:
            return "*"
        return origin if origin in allowed else None

    def _check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise RequestError(
                HTTPStatus.UNAUTHORIZED,
                "this server needs an API key: send 'Authorization: Bearer KEY' (the key charrnn serve was given)",
                code="invalid_api_key",
            )

    def _deadline(self, request: Request) -> float:
        started = request.scope.get("state", {}).get(_STARTED, time.monotonic())
        return started + self.config.request_timeout

    async def _json_body(self, request: Request, deadline: float) -> dict[str, Any]:
        """The body, its size bound enforced while reading, within the request's deadline."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        too_large = f"the body is over this server's limit of {limit:,} bytes: send less"
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large, code="body_too_large")
        body = bytearray()
        try:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large, code="body_too_large")
        except TimeoutError:
            raise RequestError(  # closes the connection (see error_response): the rest of the body is not waited for
                HTTPStatus.REQUEST_TIMEOUT,
                f"the body did not arrive within {self.config.request_timeout:g} s (it had {len(body):,} bytes): send it at once",
                code="timeout",
            ) from None
        # Parsed in a worker thread, as the request is turned into a job: a large body never stalls the event loop.
        return await anyio.to_thread.run_sync(parse_body, bytes(body))

    # -- the endpoints ---------------------------------------------------------------------
    async def chat_page(self, request: Request) -> Response:
        # The page fetches nothing from anywhere else, and the policy makes sure of it.
        policy = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:"
        return Response(self.page, media_type="text/html; charset=utf-8", headers={"Content-Security-Policy": policy})

    async def health(self, request: Request) -> Response:
        config = self.config
        return json_response(
            HTTPStatus.OK,
            {
                "status": "ok",
                "model": {"id": self.model_id, **self.sampler.model.config.to_dict()},
                "template": self.template.to_dict(),
                "limits": {
                    "max_length": config.max_length,
                    "max_n": config.max_n,
                    "max_body_bytes": config.max_body_bytes,
                    "max_concurrent": config.max_concurrent,
                    "max_queue": config.max_queue,
                    "request_timeout": config.request_timeout,
                    "max_stops": MAX_STOPS,
                    "max_stop_chars": MAX_STOP_CHARS,
                },
                "defaults": {
                    "max_tokens": config.default_length,
                    **{k: getattr(SAMPLE_DEFAULTS, k) for k in ("temperature", "top_k", "top_p")},
                },
                "cache": self.cache.stats(),
                "load": {"running": self.busy.running, "waiting": self.busy.waiting},
                "auth": config.api_key is not None,
            },
        )

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "charrnn"}

    async def models(self, request: Request) -> Response:
        self._check_key(request)
        return json_response(HTTPStatus.OK, {"object": "list", "data": [self._model_card()]})

    async def one_model(self, request: Request) -> Response:
        self._check_key(request)
        if request.path_params["model_id"] != self.model_id:
            raise RequestError(
                HTTPStatus.NOT_FOUND, f"this server holds one model, {self.model_id!r}", "model", "model_not_found"
            )
        return json_response(HTTPStatus.OK, self._model_card())

    async def retired(self, request: Request) -> Response:
        raise RequestError(
            HTTPStatus.GONE,
            "POST /complete was retired: use POST /v1/completions (the OpenAI protocol; max_tokens for length)",
            code="retired",
        )

    async def completions(self, request: Request) -> Response:
        self._check_key(request)
        deadline = self._deadline(request)
        body = await self._json_body(request, deadline)
        job = await anyio.to_thread.run_sync(completion_job, body, self.config, self.sampler.tokenizer)
        return await self._answer(job, deadline)

    async def chat_completions(self, request: Request) -> Response:
        self._check_key(request)
        deadline = self._deadline(request)
        body = await self._json_body(request, deadline)
        job = await anyio.to_thread.run_sync(chat_job, body, self.config, self.sampler.tokenizer, self.template)
        return await self._answer(job, deadline)

    # -- generation ------------------------------------------------------------------------
    def context_for(self, pieces: list[str]) -> tuple[Context, int, int]:
        """The context after ``pieces``, from the longest prefix in the state cache; with the
        characters read in all and those a cached state stood for. Runs in a worker thread."""
        keys = piece_keys(pieces)
        context, start = None, 0
        for i in range(len(keys) - 1, -1, -1):
            context = self.cache.get(keys[i])
            if context is not None:
                start = i + 1
                break
        self.cache.count(start > 0)
        for piece in pieces[start:]:  # the same reads, one per piece, as a miss makes: a hit changes nothing
            context = self.sampler.read(piece, context)
        if context is None:  # nothing to read: start as a prompt-less sample does
            context = self.sampler.read("")
        elif start < len(keys):
            self.cache.put(keys[-1], context)
        total = sum(map(len, pieces))
        return context, total, sum(map(len, pieces[:start]))

    def _work(self, job: Job, emit: Callable[[tuple], None], cancel: threading.Event, deadline: float) -> None:
        """The generation of one request in a worker thread: ``("ready", prompt chars, cached chars)``,
        then ``("piece", i, text)`` and ``("end", i, finish_reason)`` per choice, ``("done",)``;
        ``("error", exception)`` in place of the rest when something fails."""
        try:
            context, total, cached = self.context_for(job.pieces)
            emit(("ready", total, cached))
            for i, seed in enumerate(job.seeds()):
                reply = self.sampler.continue_from(context, keep_context=False, seed=seed, **job.options)
                try:
                    for piece in reply:
                        if cancel.is_set():
                            return
                        if time.monotonic() > deadline:
                            emit(("error", TimeoutError(f"the reply took longer than {self.config.request_timeout:g} s")))
                            return
                        emit(("piece", i, piece))
                finally:
                    reply.close()  # a client that left stops the generation here
                emit(("end", i, reply.finish_reason))
            emit(("done",))
        except BaseException as exc:  # handed to the event loop, which answers it
            emit(("error", exc))

    async def _start(self, job: Job, deadline: float) -> tuple[asyncio.Queue, threading.Event, Answer]:
        """Wait for a slot, start the job in a worker, and wait until its prompt is read."""
        await self.busy.acquire(deadline)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: tuple) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop has closed (the server is stopping): nobody to tell
                cancel.set()

        def work() -> None:
            try:
                self._work(job, emit, cancel, deadline)
            finally:
                try:
                    loop.call_soon_threadsafe(self.busy.release)
                except RuntimeError:
                    pass

        try:
            self.pool.submit(work)
        except BaseException:
            self.busy.release()
            raise
        try:
            first = await _get(queue, deadline)
        except TimeoutError:
            cancel.set()
            raise _as_request_error(TimeoutError("reading the prompt")) from None
        if first[0] == "error":
            raise _as_request_error(first[1])
        answer = Answer(job, self.model_id, self.fingerprint, prompt_chars=first[1], cached_chars=first[2])
        return queue, cancel, answer

    async def _answer(self, job: Job, deadline: float) -> Response:
        queue, cancel, answer = await self._start(job, deadline)
        if job.stream:
            return StreamingResponse(
                self._events(queue, cancel, answer, deadline),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        texts, reasons = [""] * job.n, [None] * job.n
        try:
            while (item := await _get(queue, deadline))[0] != "done":
                if item[0] == "piece":
                    texts[item[1]] += item[2]
                elif item[0] == "end":
                    reasons[item[1]] = item[2]
                elif item[0] == "error":
                    raise _as_request_error(item[1])
        except TimeoutError:
            raise _as_request_error(TimeoutError("the reply")) from None
        finally:
            cancel.set()
        return json_response(HTTPStatus.OK, answer.body(texts, reasons))

    async def _events(
        self, queue: asyncio.Queue, cancel: threading.Event, answer: Answer, deadline: float
    ) -> AsyncIterator[bytes]:
        """The stream: a first chunk per choice, the pieces (those waiting, joined into one chunk), the ends, [DONE]."""
        written, started = 0, set()
        try:
            while True:
                try:
                    items = [await _get(queue, deadline)]
                except TimeoutError:
                    items = [("error", TimeoutError("the stream"))]
                while not queue.empty():
                    items.append(queue.get_nowait())
                out = []
                for item in _coalesce(items):
                    kind = item[0]
                    if kind == "piece":
                        _, i, text = item
                        first = i not in started
                        started.add(i)
                        written += len(text)
                        out.append(sse(answer.chunk(i, text, first=first)))
                    elif kind == "end":
                        _, i, reason = item
                        if i not in started and answer.job.kind == "chat":
                            started.add(i)
                            out.append(sse(answer.chunk(i, "", first=True)))
                        out.append(sse(answer.chunk(i, None if answer.job.kind == "chat" else "", reason)))
                    elif kind == "error":
                        exc = _as_request_error(item[1])
                        out.append(sse(exc.body()))
                        yield b"".join(out)
                        return
                    elif kind == "done":
                        if answer.job.include_usage:
                            out.append(sse(answer.usage_chunk(written)))
                        out.append(sse("[DONE]"))
                        yield b"".join(out)
                        return
                yield b"".join(out)
        finally:
            cancel.set()  # the client left (or the stream ended): the worker stops at its next character

    # -- running ---------------------------------------------------------------------------
    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


async def _get(queue: asyncio.Queue, deadline: float) -> tuple:
    """The worker's next item; TimeoutError past the deadline (with a second's grace for the worker's own check)."""
    try:
        return await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()) + 1.0)
    except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
        raise TimeoutError from None


def _coalesce(items: list[tuple]) -> list[tuple]:
    """Adjacent pieces of one choice as one piece: a slow reader gets fewer, larger chunks."""
    out: list[tuple] = []
    for item in items:
        if item[0] == "piece" and out and out[-1][0] == "piece" and out[-1][1] == item[1]:
            out[-1] = ("piece", item[1], out[-1][2] + item[2])
        else:
            out.append(item)
    return out


def _as_request_error(exc: BaseException) -> RequestError:
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, CharRNNError):  # a prompt the model cannot read: the client's to fix
        return RequestError(HTTPStatus.BAD_REQUEST, str(exc), "messages", "invalid_prompt")
    if isinstance(exc, TimeoutError):
        return RequestError(HTTPStatus.GATEWAY_TIMEOUT, f"{exc} went past this server's request deadline", code="timeout")
    log.error("internal error in a generation: %s: %s", type(exc).__name__, exc)
    return RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error: see the server log", code="internal_error")


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
    return uvicorn.Server(config)


class Running:
    """A server running in a background thread (tests, benchmarks): ``url``, then ``stop()``."""

    def __init__(self, sampler: Sampler, config: ServeConfig | None = None, template: ChatTemplate | None = None):
        self.server = Server(sampler, config, template)
        config = self.server.config
        self.socket = listen(config.host, config.port, config.backlog)
        self.port = self.socket.getsockname()[1]
        self.url = f"http://{config.host}:{self.port}"
        self._uvicorn = uvicorn_server(self.server)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(30)
        self.server.close()
        self.socket.close()

    def __enter__(self) -> "Running":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

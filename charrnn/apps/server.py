"""A small HTTP server for prototypes in other languages: JSON completions and SSE streams.

Standard library only (``http.server.ThreadingHTTPServer``): one thread per
connection, all sharing one loaded :class:`~charrnn.generation.sampler.Sampler` (which is
thread-safe). Bound to 127.0.0.1 unless told otherwise. Endpoints:

``GET /health``
    ``{"status": "ok", "model": {...}, "limits": {...}, "defaults": {...}}``.

``POST /complete`` with a JSON object::

    {"prompt": "ROMEO:\\n", "length": 200, "temperature": 0.8, "top_k": 0,
     "top_p": 1.0, "seed": 1, "stop": ["\\n\\n"], "stream": false}

    Every field is optional. The answer is ``{"text", "finish_reason" ("stop" or
    "length"), "seed", "length", "warnings"}``; the seed is drawn and returned when not
    given, so any answer can be reproduced. With ``"stream": true`` the answer is
    server-sent events: ``data: {"text": "..."}`` per piece, then ``event: done`` with
    the same fields as the JSON answer except ``text``. Joined, the pieces are exactly
    the text the JSON answer gives for the same request.

Limits: a body over ``max_body_bytes`` is refused with 413; a ``length`` over
``max_length`` is refused with 400 (not clamped: a client asking for more than it can
get should know); at most ``max_concurrent`` generations run at once, the others wait
up to ``queue_timeout`` seconds, then get 503. Every error is JSON ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..config import SAMPLE_DEFAULTS, SampleConfig
from ..errors import CharRNNError, ConfigError
from ..generation.sampler import Sampler

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_LENGTH = 2000
MAX_BODY_BYTES = 64 * 1024
MAX_CONCURRENT = 4
# Stop strings are checked after every character: bound their number and size.
MAX_STOPS, MAX_STOP_CHARS = 8, 64
# A body a little over the limit is read and dropped before the 413, so the client
# sees the answer rather than a connection reset; a far larger one is not read at all.
_DRAIN_BYTES = 1024 * 1024
_FIELDS = ("prompt", "length", "temperature", "top_k", "top_p", "seed", "stop", "stream")
_MAX_SEED = (1 << 63) - 1


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a sentence for the client."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class CompletionServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding the sampler and the limits its handlers enforce."""

    daemon_threads = True  # a stuck client never keeps the process alive

    def __init__(
        self,
        address: tuple[str, int],
        sampler: Sampler,
        *,
        max_length: int = MAX_LENGTH,
        default_length: int | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_concurrent: int = MAX_CONCURRENT,
        queue_timeout: float = 30.0,
        request_timeout: float = 60.0,
        quiet: bool = False,
    ):
        if default_length is None:  # the sampling default, within this server's limit
            default_length = min(SAMPLE_DEFAULTS.length, max_length)
        if not 1 <= default_length <= max_length:
            raise ConfigError(f"default length {default_length} must be in [1, max length {max_length}]")
        if max_body_bytes < 1 or max_concurrent < 1:
            raise ConfigError("max body bytes and max concurrent generations must be at least 1")
        self.sampler = sampler
        self.max_length = max_length
        self.default_length = default_length
        self.max_body_bytes = max_body_bytes
        self.queue_timeout = queue_timeout
        self.request_timeout = request_timeout
        self.quiet = quiet
        self.slots = threading.BoundedSemaphore(max_concurrent)
        self.max_concurrent = max_concurrent
        super().__init__(address, CompletionHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(sampler: Sampler, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **limits: Any) -> CompletionServer:
    """A server for ``sampler`` bound to ``host:port`` (port 0: any free port); call ``serve_forever()``."""
    return CompletionServer((host, port), sampler, **limits)


# --- requests ---------------------------------------------------------------------------------


def _parse_request(body: bytes, server: CompletionServer) -> tuple[str, dict[str, Any], bool]:
    """(prompt, sampling options, stream?) from a request body, or a RequestError (400)."""
    bad = HTTPStatus.BAD_REQUEST
    try:
        request = json.loads(body.decode("utf-8")) if body.strip() else {}
    except UnicodeDecodeError:
        raise RequestError(bad, "the body is not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise RequestError(bad, f"the body is not valid JSON ({exc})") from None
    if not isinstance(request, dict):
        raise RequestError(bad, 'the body must be a JSON object, e.g. {"prompt": "ROMEO:\\n"}')
    unknown = sorted(set(request) - set(_FIELDS))
    if unknown:
        raise RequestError(bad, f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(_FIELDS)}")
    prompt = request.get("prompt", "")
    if not isinstance(prompt, str):
        raise RequestError(bad, "prompt must be a string")
    stream = request.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(bad, "stream must be true or false")
    length = request.get("length", server.default_length)
    if isinstance(length, int) and not isinstance(length, bool) and length > server.max_length:
        raise RequestError(bad, f"length {length} is above this server's limit of {server.max_length} characters")
    seed = request.get("seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & _MAX_SEED  # returned, so the answer can be reproduced
    elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= _MAX_SEED:
        raise RequestError(bad, f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
    stop = request.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or any(isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in stop):
        raise RequestError(
            bad, f"stop must be a string or a list of at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters"
        )
    options = {k: request[k] for k in ("temperature", "top_k", "top_p") if k in request}
    options.update(length=length, seed=seed, stop=tuple(stop))
    try:
        SampleConfig.from_options(**options)  # every option checked before anything is generated
    except (ConfigError, TypeError) as exc:
        raise RequestError(bad, str(exc)) from None
    return prompt, options, stream


class CompletionHandler(BaseHTTPRequestHandler):
    """One connection: one request, answered as JSON or as server-sent events, then closed."""

    server: CompletionServer
    # HTTP/1.1 for "Expect: 100-continue" (curl sends it for larger bodies): an oversize
    # body is refused before the client sends it. Every answer closes the connection.
    protocol_version = "HTTP/1.1"
    server_version = "charrnn-serve"
    _streaming = False  # set once a stream's 200 and headers have gone out

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # a silent client cannot hold a thread forever
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    # -- answers ----------------------------------------------------------------------------
    def _send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        body = (json.dumps(payload, ensure_ascii=False) + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._send_json(status, {"error": message})

    def _declared_length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted: send a Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "a POST needs a Content-Length header")
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {raw!r}")
        if length > self.server.max_body_bytes:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body is {length:,} bytes; this server takes at most {self.server.max_body_bytes:,}",
            )
        return length

    def handle_expect_100(self) -> bool:
        try:
            self._declared_length()
        except RequestError as exc:
            self._error(exc.status, str(exc))  # the client never sends the body
            return False
        return super().handle_expect_100()

    # -- methods ----------------------------------------------------------------------------
    def do_GET(self) -> None:
        if self.path != "/health":
            self._not_here()
            return
        config = self.server.sampler.model.config
        self._send_json(
            HTTPStatus.OK,
            {
                "status": "ok",
                "model": {**config.to_dict()},
                "limits": {
                    "max_length": self.server.max_length,
                    "max_body_bytes": self.server.max_body_bytes,
                    "max_concurrent": self.server.max_concurrent,
                    "max_stops": MAX_STOPS,
                    "max_stop_chars": MAX_STOP_CHARS,
                },
                "defaults": {
                    "length": self.server.default_length,
                    **{k: getattr(SAMPLE_DEFAULTS, k) for k in ("temperature", "top_k", "top_p")},
                },
            },
        )

    def do_POST(self) -> None:
        if self.path != "/complete":
            self._not_here()
            return
        try:
            try:
                length = self._declared_length()
            except RequestError as exc:
                if exc.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                    self._drain()
                raise
            prompt, options, stream = _parse_request(self.rfile.read(length), self.server)
            if not self.server.slots.acquire(timeout=self.server.queue_timeout):
                raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is busy: try again shortly")
            try:
                self._complete(prompt, options, stream)
            finally:
                self.server.slots.release()
        except RequestError as exc:
            self._error(exc.status, str(exc))
        except CharRNNError as exc:  # a prompt the model cannot read
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; nothing to answer
        except Exception as exc:  # never a traceback to the client; the log gets it
            self.log_error("internal error: %r", exc)
            if self._streaming:  # the 200 is out already: end the stream with an error event
                self._event({"error": "internal error: see the server log"}, name="error")
            else:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error: see the server log")

    def do_PUT(self) -> None:
        self._not_here()

    do_DELETE = do_PATCH = do_PUT

    def _not_here(self) -> None:
        known = {"/health": "GET", "/complete": "POST"}
        if self.path in known:
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.path} takes {known[self.path]}")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no {self.path} here: use POST /complete or GET /health")

    def _drain(self) -> None:
        """Read and drop a too-large body (up to a bound) so the 413 reaches the client."""
        try:
            remaining = min(int(self.headers.get("Content-Length", 0)), _DRAIN_BYTES)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 65536))
                if not chunk:
                    break
                remaining -= len(chunk)
        except (OSError, ValueError):
            pass

    # -- generation -------------------------------------------------------------------------
    def _complete(self, prompt: str, options: dict[str, Any], stream: bool) -> None:
        sampler = self.server.sampler
        unknown = sampler.tokenizer.unknown_chars(prompt)
        warnings = [sampler.tokenizer.unknown_note(unknown)] if unknown else []
        # Reading the prompt checks it: a refused one still gets a JSON 400, before any 200 goes out.
        pieces = sampler.continue_from(sampler.read(prompt), keep_context=False, **options)
        try:
            first = next(pieces, "")
            if not stream:
                text = first + "".join(pieces)
                self._send_json(
                    HTTPStatus.OK, {"text": text, **self._summary(len(text), pieces.finish_reason, options, warnings)}
                )
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("X-Accel-Buffering", "no")  # proxies: pass each event on at once
            self.send_header("Connection", "close")  # the stream ends when the connection does
            self.end_headers()
            self.close_connection = True
            self._streaming = True
            text_length = 0
            for piece in _prepend(first, pieces):
                self._event({"text": piece})
                text_length += len(piece)
            self._event(self._summary(text_length, pieces.finish_reason, options, warnings), name="done")
        finally:
            pieces.close()  # a client that left stops the generation here

    def _summary(self, text_length: int, reason: str | None, options: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
        return {"finish_reason": reason, "seed": options["seed"], "length": text_length, "warnings": warnings}

    def _event(self, payload: dict[str, Any], name: str | None = None) -> None:
        head = f"event: {name}\n" if name else ""
        self.wfile.write(f"{head}data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    """``first`` (when not empty), then the rest."""
    if first:
        yield first
    yield from rest

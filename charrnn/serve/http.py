"""The server's HTTP side: uvicorn's h11 protocol with a header deadline, routes for every
method, the Host check (against DNS rebinding), CORS, the API key, the bounded JSON body,
and every answer (errors too) as JSON.

Nothing here knows about models or generation (``charrnn.serve.app`` does): a route is a
path and a handler per method, and a handler's :class:`RequestError` is its answer.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import anyio
import h11
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import RequestError, error_body
from .settings import ServeConfig

log = logging.getLogger("charrnn.serve")
_STARTED = "charrnn_started"  # the request's first moment (monotonic), put in the scope's state by the protocol
Handler = Callable[[Request], Awaitable[Response]]


def json_response(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """``payload`` as a JSON answer with ``status``."""
    # ensure_ascii: the body is valid UTF-8 whatever a client managed to put in an echoed string.
    body = json.dumps(payload, ensure_ascii=True) + "\n"
    return Response(body, status_code=int(status), headers=headers, media_type="application/json")


def error_response(exc: RequestError, headers: dict[str, str] | None = None, close: bool = False) -> Response:
    """A refusal as OpenAI's error object; a 408 (or ``close``) also closes the connection."""
    if close or exc.status == HTTPStatus.REQUEST_TIMEOUT:  # a client too slow to finish its request gets no more time
        headers = {**(headers or {}), "Connection": "close"}
    return json_response(exc.status, exc.body(), headers)


# --- the protocol: a deadline for the headers, JSON for uvicorn's own refusals -------------------


def _raw_json(status: HTTPStatus, message: str) -> bytes:
    body = json.dumps(error_body(status, message)).encode() + b"\n"
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nx-content-type-options: nosniff\r\nconnection: close\r\n\r\n"
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
        """uvicorn's H11Protocol with a timer per request, armed at its start, disarmed when its headers are in."""

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


# --- routes: every method answered, in JSON --------------------------------------------------------


class _AnyMethod(Route):
    """A route for every method, even unknown ones: the endpoint answers a wrong one with a JSON 405
    (Starlette's own 405 is plain text)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        return (Match.FULL if match == Match.PARTIAL else match), child

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def json_app(routes: dict[str, dict[str, Handler]], config: ServeConfig) -> Starlette:
    """The Starlette app of ``routes`` (path -> method -> handler), with OPTIONS, HEAD, CORS,
    a JSON 405 for a method a path does not take and a JSON 404 for any other path (also for
    a target no route can match: ``*``, an absolute URI)."""
    return Starlette(
        routes=[_AnyMethod(path, _endpoint(path, handlers, config)) for path, handlers in routes.items()]
        + [_AnyMethod("/{path:path}", _endpoint("", {}, config, _not_found))],
        exception_handlers={HTTPException: _http_exception},
    )


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (a request target that is not a path), in JSON."""
    status = exc.status_code if isinstance(exc, HTTPException) else HTTPStatus.INTERNAL_SERVER_ERROR
    message = "the request target is not a path on this server: use POST /v1/chat/completions, POST /v1/completions"
    return _secured(error_response(RequestError(status, message, code="not_found"), close=True))


def _secured(response: Response) -> Response:
    response.headers["X-Content-Type-Options"] = "nosniff"  # a JSON answer is never run as a script or page
    return response


def _refusal(request: Request, config: ServeConfig) -> RequestError | None:
    """What every request is checked for before its route: a Host this server answers to, one body framing."""
    host = request.headers.get("host")
    if host is not None and not host_allowed(host, config.allowed_host):
        return RequestError(
            HTTPStatus.MISDIRECTED_REQUEST,
            f"this server does not answer to the host {ascii(host[:80])}: call it by its address (http://127.0.0.1:PORT), "
            "or start it with --allowed-host NAME",
            code="host_not_allowed",
        )
    if "content-length" in request.headers and "transfer-encoding" in request.headers:
        return RequestError(
            HTTPStatus.BAD_REQUEST,
            "a request may not have both Content-Length and Transfer-Encoding: send one of them",
            code="invalid_request",
        )
    return None


def _endpoint(path: str, handlers: dict[str, Handler], config: ServeConfig, fallback: Handler | None = None) -> Handler:
    allowed = sorted({*handlers, "OPTIONS", *(["HEAD"] if "GET" in handlers else [])})

    async def endpoint(request: Request) -> Response:
        method = request.method
        origin = allowed_origin(request, config.cors_origin)
        if (refusal := _refusal(request, config)) is not None:
            return _secured(error_response(refusal, close=True))
        if fallback is not None:
            response = await fallback(request)
        elif method == "OPTIONS":
            response = _options(path, allowed, cors=origin is not None)
        elif (handler := handlers.get("GET" if method == "HEAD" else method)) is None:
            message = f"{request.url.path} takes {' or '.join(sorted(handlers))}, not {method}"
            exc = RequestError(HTTPStatus.METHOD_NOT_ALLOWED, message, code="method_not_allowed")
            response = error_response(exc, {"Allow": ", ".join(allowed)})
        else:
            response = await _guarded(handler, request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return _secured(response)

    return endpoint


def _options(path: str, allowed: list[str], cors: bool) -> Response:
    """The answer to OPTIONS: the methods, and for an allowed origin what a preflight asks."""
    response = json_response(HTTPStatus.OK, {"path": path, "methods": allowed}, {"Allow": ", ".join(allowed)})
    if cors:
        response.headers.update(
            {
                "Access-Control-Allow-Methods": ", ".join(allowed),
                "Access-Control-Allow-Headers": "Authorization, Content-Type",
                "Access-Control-Max-Age": "600",
            }
        )
    return response


async def _guarded(handler: Handler, request: Request) -> Response:
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


async def _not_found(request: Request) -> Response:
    message = f"no {ascii(request.url.path)[1:-1]} here: use POST /v1/chat/completions, POST /v1/completions, GET /v1/models"
    return error_response(RequestError(HTTPStatus.NOT_FOUND, message, code="not_found"))


# --- what a handler checks: the origin, the key, the deadline, the body -----------------------------


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether a request naming ``host`` (its Host header) is answered: an IP address, localhost, or a name in ``allowed``.

    A page that rebinds its own domain to 127.0.0.1 still sends that domain as the Host,
    so answering only addresses and localhost names keeps such pages out.
    """
    if "*" in allowed:
        return True
    name = host[1 : host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost") or name in (h.lower().rstrip(".") for h in allowed):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def allowed_origin(request: Request, origins: tuple[str, ...]) -> str | None:
    """The ``Access-Control-Allow-Origin`` for this request (None: no CORS headers)."""
    origin = request.headers.get("origin")
    if origin is None or not origins:
        return None
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def bears_api_key(request: Request, key: str | None) -> bool:
    """Whether the request bears ``key`` (``Authorization: Bearer KEY``); any request does where there is none."""
    if key is None:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: how long the comparison takes says nothing of how much of the key was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8", "replace"), key.encode())


def check_api_key(request: Request, key: str | None) -> None:
    """A 401 unless the request bears ``key``; nothing to check without one."""
    if not bears_api_key(request, key):
        raise RequestError(
            HTTPStatus.UNAUTHORIZED,
            "this server needs an API key: send 'Authorization: Bearer KEY' (the key charrnn serve was given)",
            code="invalid_api_key",
        )


def request_deadline(request: Request, timeout: float) -> float:
    """When this request's time is up (monotonic): ``timeout`` s after its first byte."""
    started = request.scope.get("state", {}).get(_STARTED, time.monotonic())
    return started + timeout


async def read_body(request: Request, config: ServeConfig, deadline: float) -> bytes:
    """The body, declared as JSON (415 otherwise: a web page's form cannot send it without
    asking first), its size bound enforced while reading (413, whatever Content-Length says),
    within the request's deadline (408, and the connection closed)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise RequestError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"the body must be JSON sent as Content-Type: application/json, not {ascii(media_type or 'none')}",
            code="unsupported_media_type",
        )
    limit = config.max_body_bytes
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
            f"the body did not arrive within {config.request_timeout:g} s (it had {len(body):,} bytes): send it at once",
            code="timeout",
        ) from None
    return bytes(body)

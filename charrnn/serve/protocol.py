"""The OpenAI protocol, without the HTTP: request bodies checked into jobs, jobs' results into answers.

Nothing here knows about sockets or Starlette (``server`` does), so every rule can be
read, and tested, on its own.

Which fields are honoured, ignored or refused (the OpenAI-compatible servers' rule: an
extra field is ignored unless ignoring it would mislead the client):

- honoured: ``model`` (any name is accepted; the answer names the model that wrote it),
  ``prompt`` / ``messages``, ``max_tokens`` / ``max_completion_tokens`` (characters
  here), ``temperature``, ``top_p``, ``top_k``, ``stop``, ``seed``, ``n``, ``stream``,
  ``stream_options.include_usage``, ``echo`` (completions);
- ignored: ``user``, ``metadata``, ``store``, ``service_tier``, ``parallel_tool_calls``,
  a message's ``name``, and fields at their neutral value (``presence_penalty: 0``,
  ``logit_bias: {}``, ``logprobs: false``, ``response_format: {"type": "text"}``,
  ``tools: []``, ``tool_choice: "none"``/``"auto"`` without tools, ``best_of`` equal to
  ``n``); any other unknown field is ignored and named in the answer's ``warnings``;
- refused (400 naming the field): penalties, logit biases, log-probabilities, JSON
  response formats, tools and function calls, ``suffix``, ``best_of`` above ``n``:
  a char-RNN cannot honour them, and an answer without them would look like one with.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from .._io import parse_json
from ..config import MAX_SEED
from ..errors import PromptError
from ..generation.chat import ChatTemplate
from ..tokenizer import CharTokenizer
from .settings import ServeConfig

MAX_STOPS, MAX_STOP_CHARS = 8, 64  # stop strings are checked after every character: bound them
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_IGNORED = {"model", "user", "metadata", "store", "service_tier", "parallel_tool_calls"}
_COMMON = {"max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream", "stream_options"}
_NEUTRAL = {"presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "best_of"}
CHAT_FIELDS = _IGNORED | _COMMON | _NEUTRAL | {"messages", "max_completion_tokens", "top_logprobs", "response_format"}
CHAT_FIELDS |= {"tools", "tool_choice", "functions", "function_call"}
COMPLETION_FIELDS = _IGNORED | _COMMON | _NEUTRAL | {"prompt", "echo", "suffix"}

_ERROR_TYPES = {
    HTTPStatus.UNAUTHORIZED: "authentication_error",
    HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_error",
    HTTPStatus.INTERNAL_SERVER_ERROR: "server_error",
    HTTPStatus.SERVICE_UNAVAILABLE: "server_error",
    HTTPStatus.GATEWAY_TIMEOUT: "server_error",
}


class RequestError(Exception):
    """A request the server refuses: an HTTP status, a sentence, and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = HTTPStatus(status), param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, str(self), self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = _ERROR_TYPES.get(HTTPStatus(status), "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _bad(message: str, param: str | None, code: str = "invalid_value") -> RequestError:
    return RequestError(HTTPStatus.BAD_REQUEST, message, param, code)


def _shown(text: str) -> str:
    """A client's string as an error names it: escaped, so a lone surrogate cannot break the answer."""
    return ascii(text[:40])


# --- bodies -----------------------------------------------------------------------------------


def _no_surrogates(value: Any) -> None:
    """Refuse strings that UTF-8 cannot hold (lone surrogates from ``\\ud800`` escapes), keys included."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, at = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                path = f"{at}.{key}" if at else key
                _encodable(key, path)
                stack.append((child, path))
        elif isinstance(item, list):
            stack.extend((child, f"{at}[{i}]") for i, child in enumerate(item))
        elif isinstance(item, str):
            _encodable(item, at)


def _encodable(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        param = path.encode("ascii", "backslashreplace").decode()  # the field's name, escaped: the answer stays valid
        raise _bad(
            f"{param} holds a lone surrogate ({_shown(text)}), which is not Unicode text: send valid UTF-8", param
        ) from None


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body, or a 400 that says what is wrong with it."""
    if not body.strip():
        raise _bad('the body is empty: send a JSON object, e.g. {"messages": [{"role": "user", "content": "hi"}]}', None)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(f"the body is not UTF-8 text (byte {exc.start}): send UTF-8 JSON", None) from None
    try:
        value = parse_json(text)  # the bounds every outside JSON gets: nesting, number length, no NaN
    except json.JSONDecodeError as exc:
        raise _bad(f"the body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", None) from None
    except ValueError as exc:
        raise _bad(f"the body is not JSON this server reads ({str(exc)[:80]})", None) from None
    if not isinstance(value, dict):
        raise _bad("the body must be a JSON object, not " + type(value).__name__, None)
    _no_surrogates(value)
    return value


# --- fields -----------------------------------------------------------------------------------


def _int(request: dict[str, Any], name: str, low: int, high: int, default: int | None) -> int | None:
    value = request.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{name} must be an integer, got {_kind(value)}", name, "invalid_type")
    if not low <= value <= high:
        raise _bad(f"{name} must be in [{low}, {high:,}], got {value}", name)
    return value


def _number(request: dict[str, Any], name: str) -> float | None:
    value = request.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _bad(f"{name} must be a finite number, got {_kind(value)}", name, "invalid_type")
    return float(value)


def _bool(request: dict[str, Any], name: str) -> bool:
    value = request.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"{name} must be true or false, got {_kind(value)}", name, "invalid_type")
    return value


def _kind(value: Any) -> str:
    shown = json.dumps(value, ensure_ascii=True)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _stops(request: dict[str, Any]) -> tuple[str, ...]:
    stop = request.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise _bad(
            f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters",
            "stop",
        )
    return tuple(stops)


def _refuse_unhonoured(request: dict[str, Any], n: int) -> None:
    """400 for the fields a char-RNN cannot honour, unless they ask for nothing (their neutral value)."""
    neutral = {
        "presence_penalty": lambda v: v in (None, 0),
        "frequency_penalty": lambda v: v in (None, 0),
        "logit_bias": lambda v: v in (None, {}),
        "logprobs": lambda v: v in (None, False, 0) and not isinstance(v, float),
        "top_logprobs": lambda v: v in (None, 0),
        "best_of": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v == n),
        "suffix": lambda v: v in (None, ""),
        "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
        "tools": lambda v: v in (None, []),
        "functions": lambda v: v in (None, []),
        "tool_choice": lambda v: v in (None, "none", "auto") and not request.get("tools"),
        "function_call": lambda v: v in (None, "none", "auto") and not request.get("functions"),
    }
    for name, ok in neutral.items():
        if name in request and not ok(request[name]):
            raise _bad(
                f"{name} is not supported: a character-level RNN has no {name.replace('_', ' ')}; leave it out",
                name,
                "unsupported_parameter",
            )


# --- jobs -------------------------------------------------------------------------------------


@dataclass
class Job:
    """What one request asks for, checked: the text to read (in pieces), how to sample, how to answer."""

    kind: str  # "chat" or "completion"
    pieces: list[str]  # read one after another; the state cache keys on them (see state_cache)
    options: dict[str, Any]  # SampleConfig fields but the seed
    seed: int
    n: int
    stream: bool
    include_usage: bool
    echo: str = ""  # completions with echo: the prompt, written before the text
    warnings: list[str] = field(default_factory=list)

    def seeds(self) -> list[int]:
        """Choice i uses seed + i, so choice 0 of n is the answer to the same request with n = 1."""
        return [(self.seed + i) & MAX_SEED for i in range(self.n)]


def _common(
    request: dict[str, Any], fields: set[str], config: ServeConfig, tokenizer: CharTokenizer, length_names: tuple[str, ...]
):
    n = _int(request, "n", 1, config.max_n, 1)
    _refuse_unhonoured(request, n)
    warnings = []
    unknown = sorted(set(request) - fields)
    if unknown:
        warnings.append("ignored unknown field(s) " + ", ".join(ascii(u) if not u.isascii() else u for u in unknown))
    length = None
    for name in length_names:
        length = _int(request, name, 0, config.max_length, length)
    options: dict[str, Any] = {"length": config.default_length if length is None else length}
    for name in ("temperature", "top_p"):
        value = _number(request, name)
        if value is not None:
            options[name] = value
    if "temperature" in options and options["temperature"] < 0:
        raise _bad(f"temperature must be >= 0 (0 is greedy), got {options['temperature']:g}", "temperature")
    if "top_p" in options and not 0 < options["top_p"] <= 1:
        raise _bad(f"top_p must be in (0, 1] (1 turns it off), got {options['top_p']:g}", "top_p")
    top_k = _int(request, "top_k", 0, 1 << 62, None)
    if top_k is not None:
        options["top_k"] = 0 if top_k >= len(tokenizer.chars) else top_k  # k at or past the vocabulary: off
    seed = _int(request, "seed", 0, MAX_SEED, None)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & MAX_SEED  # returned, so the answer can be reproduced
    stream = _bool(request, "stream")
    stream_options = request.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _bad('stream_options must be an object such as {"include_usage": true}', "stream_options")
        include_usage = _bool(stream_options, "include_usage")
    return n, options, seed, stream, include_usage, warnings


def completion_job(request: dict[str, Any], config: ServeConfig, tokenizer: CharTokenizer) -> Job:
    """A ``POST /v1/completions`` body as a job (400 on anything wrong, naming the field)."""
    n, options, seed, stream, usage, warnings = _common(request, COMPLETION_FIELDS, config, tokenizer, ("max_tokens",))
    prompt = request.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise _bad("prompt must be a string (or a list of one string); token ids are not read here: send text", "prompt")
    _check_text(tokenizer, prompt, "prompt", warnings)
    options["stop"] = _stops(request)
    echo = prompt if _bool(request, "echo") else ""
    return Job("completion", [prompt] if prompt else [], options, seed, n, stream, usage, echo, warnings)


def _content(message: dict[str, Any], where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant" and not message.get("tool_calls"):
        return ""
    if isinstance(content, list):  # content parts: text parts only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f'{where}.content[{j}] must be a text part, {{"type": "text", "text": "..."}}', f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"{where}.content must be a string or a list of text parts", f"{where}.content", "invalid_type")


def _check_text(tokenizer: CharTokenizer, text: str, what: str, warnings: list[str]) -> None:
    try:
        unknown = tokenizer.check_known(text, what)
    except PromptError as exc:
        raise _bad(str(exc), what) from None
    if unknown:
        note = tokenizer.unknown_note(unknown)
        if note not in warnings:
            warnings.append(note)


def chat_pieces(template: ChatTemplate, messages: list[tuple[str, str]]) -> list[str]:
    """The text a conversation reads, in pieces, ending where the model's reply begins.

    As :class:`~charrnn.generation.chat.ChatSession` writes it: system text verbatim (the
    preamble); a user turn as ``user_prefix + text + separator``; an assistant turn as
    ``bot_prefix + text`` (after the rest of a separator, when the text before it does
    not end with one). A reply's start (``bot_prefix``) is a piece of its own, so the
    state after one request's prompt is a boundary of the next request's.
    """
    pieces: list[str] = []
    tail, previous = "", None
    keep = len(template.turn_separator)

    def put(text: str) -> None:
        nonlocal tail
        if text:
            pieces.append(text)
            tail = (tail + text)[-keep:] if keep else ""

    def reply_start() -> str:
        return template.bot_prefix if previous == "user" else template.separator_after(tail) + template.bot_prefix

    for role, content in messages:
        if role == "system":
            put(content)
        elif role == "user":
            put(template.separator_after(tail) + template.user_prefix + content + template.turn_separator)
        else:
            put(reply_start())
            put(content)
        previous = role
    put(reply_start())
    return pieces


def chat_job(request: dict[str, Any], config: ServeConfig, tokenizer: CharTokenizer, template: ChatTemplate) -> Job:
    """A ``POST /v1/chat/completions`` body as a job (400 on anything wrong, naming the field)."""
    names = ("max_tokens", "max_completion_tokens")
    n, options, seed, stream, usage, warnings = _common(request, CHAT_FIELDS, config, tokenizer, names)
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad('messages must be a non-empty list, e.g. [{"role": "user", "content": "Good morrow."}]', "messages")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object with a role and a content", where, "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            shown = _kind(role) if not isinstance(role, str) else _shown(role)
            raise _bad(f"{where}.role {shown} is not a role here: use system, user or assistant", f"{where}.role")
        if message.get("tool_calls"):
            raise _bad(f"{where}.tool_calls is not supported: a character-level RNN calls no tools", f"{where}.tool_calls")
        content = _content(message, where)
        if content:
            _check_text(tokenizer, content, f"{where}.content", warnings)
        turns.append((ROLES[role], content))
    # The reply ends where the model starts a new turn, and at the client's own stops too.
    options["stop"] = tuple(dict.fromkeys(template.stops + _stops(request)))
    return Job("chat", chat_pieces(template, turns), options, seed, n, stream, usage, "", warnings)


# --- answers ----------------------------------------------------------------------------------


@dataclass
class Answer:
    """The ids and totals of one request's answer, shared by its JSON body and its stream chunks."""

    job: Job
    model: str
    fingerprint: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    prompt_chars: int = 0
    cached_chars: int = 0

    def _head(self, object_name: str) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.job.kind == "chat" else "cmpl-"
        head = {"id": prefix + self.id, "object": object_name, "created": self.created, "model": self.model}
        head["system_fingerprint"] = self.fingerprint
        return head

    def usage(self, completion_chars: int) -> dict[str, Any]:
        """Characters, in the protocol's token fields; the prompt's characters a cached state stood for are ``cached_tokens``."""
        return {
            "prompt_tokens": self.prompt_chars,
            "completion_tokens": completion_chars,
            "total_tokens": self.prompt_chars + completion_chars,
            "prompt_tokens_details": {"cached_tokens": self.cached_chars},
        }

    def body(self, texts: list[str], reasons: list[str | None]) -> dict[str, Any]:
        """The whole answer: ``chat.completion`` or ``text_completion``."""
        if self.job.kind == "chat":
            choices = [
                {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": None}
                for i, (t, r) in enumerate(zip(texts, reasons))
            ]
            head = self._head("chat.completion")
        else:
            choices = [
                {"index": i, "text": self.job.echo + t, "finish_reason": r, "logprobs": None}
                for i, (t, r) in enumerate(zip(texts, reasons))
            ]
            head = self._head("text_completion")
        body = {**head, "choices": choices, "usage": self.usage(sum(len(t) for t in texts))}
        return {**body, "seed": self.job.seed, "warnings": self.job.warnings}

    def chunk(self, index: int, text: str | None, reason: str | None = None, first: bool = False) -> dict[str, Any]:
        """One streamed piece (or, with ``reason``, a choice's end): ``chat.completion.chunk`` / ``text_completion``."""
        if self.job.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
            chunk = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
            chunk = {**self._head("text_completion"), "choices": [choice]}
        if first and index == 0:  # the extras once, at the start
            chunk.update(seed=self.job.seed, warnings=self.job.warnings)
        return chunk

    def usage_chunk(self, completion_chars: int) -> dict[str, Any]:
        object_name = "chat.completion.chunk" if self.job.kind == "chat" else "text_completion"
        return {**self._head(object_name), "choices": [], "usage": self.usage(completion_chars)}


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: JSON`` (or ``data: [DONE]``) and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()

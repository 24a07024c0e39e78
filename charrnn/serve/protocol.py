"""The OpenAI protocol's requests, without the HTTP: bodies parsed and checked, refusals as OpenAI errors.

Nothing here knows about sockets or Starlette (``charrnn.serve.http`` and
``charrnn.serve.app`` do), so every rule can be read, and tested, on its own. The
request bodies are pydantic models (:class:`CompletionRequest`,
:class:`ChatCompletionRequest`, :class:`ChatMessage`), as in vLLM's protocol module;
``charrnn.serve.jobs`` turns them into jobs, ``charrnn.serve.answers`` writes the answers.

Which fields are honoured, ignored or refused (the OpenAI-compatible servers' rule: an
extra field is ignored unless ignoring it would mislead the client):

- honoured: ``model`` (any name is accepted; the answer names the model that wrote it),
  ``prompt`` / ``messages``, ``max_tokens`` / ``max_completion_tokens`` (characters
  here), ``temperature``, ``top_p``, ``top_k``, ``stop``, ``seed``, ``n``, ``stream``,
  ``stream_options.include_usage``, ``echo`` and ``logprobs`` (0-5) and ``best_of``
  (completions), ``logprobs`` and ``top_logprobs`` (0-20, chat), ``presence_penalty`` and
  ``frequency_penalty`` (OpenAI's meaning, over the generated text), ``response_format``
  (``text``, ``json_object``, ``json_schema``), and the extensions ``structured_outputs``
  (vLLM's ``regex`` | ``choice`` | ``json``), ``repetition_penalty`` (vLLM's and Hugging
  Face's), ``dry_multiplier``, ``dry_base``, ``dry_allowed_length`` and ``penalty_window``
  (:class:`~charrnn.config.SampleConfig`); a token is a character;
- ignored: ``user``, ``metadata``, ``store``, ``service_tier``, ``parallel_tool_calls``,
  a message's ``name``, and fields at their neutral value (``logit_bias: {}``,
  ``tools: []``, ``tool_choice: "none"``/``"auto"`` without tools); any other unknown
  field is ignored and named in the answer's ``warnings``;
- refused (400 naming the field): logit biases, tools and function calls, ``suffix``:
  a char-RNN cannot honour them, and an answer without them would look like one with.

The sampling limits are :class:`~charrnn.config.SampleConfig`'s own: a job's sampling
settings are a SampleConfig (``charrnn.serve.jobs``), and its ConfigError becomes the
400. Only the limits of this server (``max_tokens``, ``n``, the stop strings) are checked here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .._io import parse_json
from .settings import ServeConfig

MAX_STOPS, MAX_STOP_CHARS = 8, 64  # stop strings are checked after every character: bound them
MAX_BEST_OF = 20  # samples a completion may choose from
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

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
        """The OpenAI error object of this refusal."""
        return error_body(self.status, str(self), self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = _ERROR_TYPES.get(HTTPStatus(status), "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> RequestError:
    """A 400 for the field ``param`` (None: the body as a whole)."""
    return RequestError(HTTPStatus.BAD_REQUEST, message, param, code)


def _quoted_for_error(text: str) -> str:
    """A client's string as an error names it: escaped, so a lone surrogate cannot break the answer."""
    return ascii(text[:40])


def _json_for_error(value: Any) -> str:
    """A client's value as an error names it: its JSON, ASCII only, at most 40 characters."""
    shown = json.dumps(value, ensure_ascii=True)
    return shown if len(shown) <= 40 else shown[:37] + "..."


# --- bodies: bytes to a JSON object ---------------------------------------------------------------


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
        raise bad_request(
            f"{param} holds a lone surrogate ({_quoted_for_error(text)}), which is not Unicode text: send valid UTF-8", param
        ) from None


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body, or a 400 that says what is wrong with it.

    The body's size is bounded by its reader (``charrnn.serve.http.read_body``); here the
    nesting and number bounds every outside JSON gets (:func:`charrnn._io.parse_json`),
    and no lone surrogates anywhere.
    """
    if not body.strip():
        raise bad_request('the body is empty: send a JSON object, e.g. {"messages": [{"role": "user", "content": "hi"}]}', None)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the body is not UTF-8 text (byte {exc.start}): send UTF-8 JSON", None) from None
    try:
        value = parse_json(text)
    except json.JSONDecodeError as exc:
        raise bad_request(f"the body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", None) from None
    except ValueError as exc:
        raise bad_request(f"the body is not JSON this server reads ({str(exc)[:80]})", None) from None
    if not isinstance(value, dict):
        raise bad_request("the body must be a JSON object, not " + type(value).__name__, None)
    _no_surrogates(value)
    return value


# --- the request models ----------------------------------------------------------------------------


def _unsupported(name: str) -> PydanticCustomError:
    return PydanticCustomError(
        "unsupported_parameter",
        f"{name} is not supported: a character-level RNN has no {name.replace('_', ' ')}; leave it out",
        {"param": name},
    )


def _as_list(value: Any) -> Any:
    """One stop string as a list of one."""
    return [value] if isinstance(value, str) else value


def _as_parts(value: Any) -> Any:
    """A message's content given as a string as the one text part it stands for."""
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


def _one_string(value: Any) -> Any:
    """A list of one string where a string is meant (``prompt``) as that string."""
    return value[0] if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) else value


# The fields a char-RNN cannot honour, and when each asks for nothing (accepted, ignored); otherwise refused.
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "logit_bias": lambda v: v in (None, {}),
    "suffix": lambda v: v in (None, ""),
    "tools": lambda v: v in (None, []),
    "functions": lambda v: v in (None, []),
}
MAX_COMPLETION_LOGPROBS, MAX_TOP_LOGPROBS = 5, 20  # OpenAI's bounds: completions' logprobs, chat's top_logprobs


# strict: "1.5" is not a number nor 1 a boolean here, as in the OpenAI API; extra fields are kept, to be named.
_STRICT = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
StopStrings = Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOPS)]


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage."""

    model_config = _STRICT
    include_usage: bool | None = None


class StructuredOutputs(BaseModel):
    """``structured_outputs`` as vLLM takes it: the text matches ``regex``, is one of ``choice``, or is JSON fitting ``json``."""

    model_config = ConfigDict(strict=True, extra="forbid")
    regex: str | None = None
    choice: list[str] | None = None
    json_: Annotated[dict[str, Any] | None, Field(alias="json")] = None

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [name for name in ("regex", "choice", "json_") if getattr(self, name) is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "invalid_value",
                'structured_outputs takes one of regex, choice and json, e.g. {"choice": ["Ay", "No"]}',
                {"param": "structured_outputs"},
            )
        return self


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: a name and the schema (``strict`` is always so here)."""

    model_config = ConfigDict(strict=True, extra="allow")
    name: str | None = None
    schema_: Annotated[dict[str, Any], Field(alias="schema")] = Field(default_factory=dict)
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text``, ``json_object`` (any JSON object) or ``json_schema``."""

    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise PydanticCustomError(
                "invalid_value",
                'response_format of type json_schema needs its json_schema, {"name": ..., "schema": {...}}, and no other type takes one',
                {"param": "response_format"},
            )
        return self

    def schema_text(self) -> str | None:
        """The JSON schema the text must fit, as JSON text (None: plain text)."""
        if self.type == "json_object":
            return json.dumps({"type": "object"})
        return json.dumps(self.json_schema.schema_) if self.json_schema is not None else None


class SamplingRequest(BaseModel):
    """The fields both endpoints read (the base of :class:`CompletionRequest` and
    :class:`ChatCompletionRequest`); unknown fields are kept in ``model_extra``, ignored, then named."""

    model_config = _STRICT
    # The fields the other endpoint honours: named as ignored when they come here.
    foreign: ClassVar[frozenset[str]] = frozenset()
    # ignored
    model: Any = None
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None
    # honoured
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: Annotated[StopStrings | None, BeforeValidator(_as_list)] = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # honoured extensions (vLLM's repetition_penalty; the DRY sampler's settings, as text-generation servers name them)
    repetition_penalty: float | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    penalty_window: int | None = None
    # structured outputs: vLLM's field, and OpenAI's response_format
    structured_outputs: StructuredOutputs | None = None
    response_format: ResponseFormat | None = None
    # refused unless neutral (_NEUTRAL), whichever endpoint is asked
    logit_bias: Any = None
    suffix: Any = None
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None  # neutral without tools: checked with them, below
    function_call: Any = None

    @field_validator(*_NEUTRAL, mode="before")
    @classmethod
    def _neutral_only(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name or ""
        if not _NEUTRAL[name](value):
            raise _unsupported(name)
        return value

    @field_validator("n")
    @classmethod
    def _n_within(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _within(value, 1, _limits(info).max_n, "n")

    @field_validator("max_tokens", "max_completion_tokens", check_fields=False)
    @classmethod
    def _length_within(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _within(value, 0, _limits(info).max_length, info.field_name or "")

    @model_validator(mode="after")
    def _neutral_together(self) -> SamplingRequest:
        """The checks that depend on another field: a tool choice on the tools, one constraint at most."""
        # Any tools were refused above, so "none" and "auto" choose among none.
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none", "auto"):
                raise _unsupported(name)
        if self.structured_outputs is not None and self.response_format is not None and self.response_format.type != "text":
            raise PydanticCustomError(
                "invalid_value", "structured_outputs and response_format were both given: use one", {"param": "response_format"}
            )
        return self

    def constraint(self) -> tuple[str, dict[str, Any]] | None:
        """(the field, SampleConfig options) of the constraint asked for, if any."""
        so, rf = self.structured_outputs, self.response_format
        if so is not None:
            if so.regex is not None:
                return "structured_outputs.regex", {"regex": so.regex}
            if so.choice is not None:
                return "structured_outputs.choice", {"choices": tuple(so.choice)}
            return "structured_outputs.json", {"json_schema": json.dumps(so.json_)}
        if rf is not None and rf.schema_text() is not None:
            return "response_format", {"json_schema": rf.schema_text()}
        return None

    def logprobs_wanted(self) -> int | None:
        """How many alternatives per character the answer lists (None: no log-probabilities)."""
        return None

    def ignored(self) -> list[str]:
        """The fields given that nothing here reads: the answer names them."""
        unknown = set(self.model_extra or ()) | (self.foreign & self.model_fields_set)
        if not unknown:
            return []
        return ["ignored unknown field(s) " + ", ".join(ascii(u) if not u.isascii() else u for u in sorted(unknown))]


def _limits(info: ValidationInfo) -> ServeConfig:
    """This server's limits, passed to ``model_validate`` as its context (the defaults without one)."""
    return info.context if isinstance(info.context, ServeConfig) else ServeConfig()


def _within(value: int | None, low: int, high: int, name: str) -> int | None:
    if value is not None and not low <= value <= high:
        raise PydanticCustomError("invalid_value", f"{name} must be in [{low}, {high:,}], got {value}", {"param": name})
    return value


class CompletionRequest(SamplingRequest):
    """The body of ``POST /v1/completions``."""

    foreign: ClassVar[frozenset[str]] = frozenset({"top_logprobs", "tools", "tool_choice", "functions", "function_call"})
    prompt: Annotated[str | None, BeforeValidator(_one_string)] = None
    echo: bool | None = None
    logprobs: int | None = None  # the alternatives listed per character, 0 to 5; null: none
    top_logprobs: Any = None  # chat's field: ignored here, and named
    best_of: int | None = None  # sample this many, answer the n likeliest (by mean log-probability)

    @field_validator("logprobs")
    @classmethod
    def _logprobs_within(cls, value: int | None) -> int | None:
        return _within(value, 0, MAX_COMPLETION_LOGPROBS, "logprobs")

    @model_validator(mode="after")
    def _best_of_fits(self) -> CompletionRequest:
        if self.best_of is not None:
            n, limit = self.n or 1, MAX_BEST_OF
            if not n <= self.best_of <= limit:
                raise PydanticCustomError(
                    "invalid_value", f"best_of must be from n ({n}) to {limit}, got {self.best_of}", {"param": "best_of"}
                )
            if self.stream and self.best_of > n:
                raise PydanticCustomError(
                    "invalid_value",
                    "best_of above n cannot be streamed: the best are known only at the end",
                    {"param": "best_of"},
                )
        return self

    def logprobs_wanted(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    """One part of a message's content: only text parts are read."""

    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation: a role and its text (a string, or text parts)."""

    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[list[TextPart] | None, BeforeValidator(_as_parts)] = None
    name: Any = None  # ignored
    tool_calls: Any = None

    @model_validator(mode="after")
    def _readable(self) -> ChatMessage:
        """No tool calls; and a content but in a reply, which may be empty (the one to write)."""
        if self.tool_calls:
            raise PydanticCustomError(
                "unsupported_parameter", "is not supported: a character-level RNN calls no tools", {"field": "tool_calls"}
            )
        if self.content is None and self.role != "assistant":
            raise PydanticCustomError("invalid_type", "must be a string or a list of text parts", {"field": "content"})
        return self

    @property
    def text(self) -> str:
        """The message's text: its text parts joined."""
        return "".join(part.text for part in self.content or ())


class ChatCompletionRequest(SamplingRequest):
    """The body of ``POST /v1/chat/completions``."""

    foreign: ClassVar[frozenset[str]] = frozenset({"suffix", "best_of"})
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None  # the newer name of max_tokens; wins when both are given
    logprobs: bool | None = None
    top_logprobs: int | None = None  # alternatives listed per character, 0 to 20; needs logprobs
    best_of: Any = None  # completions' field: ignored here, and named

    @model_validator(mode="after")
    def _top_logprobs_fits(self) -> ChatCompletionRequest:
        _within(self.top_logprobs, 0, MAX_TOP_LOGPROBS, "top_logprobs")
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("invalid_value", "top_logprobs needs logprobs: true", {"param": "top_logprobs"})
        return self

    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# --- validation errors as the OpenAI 400 -----------------------------------------------------------

_TYPE_SENTENCES = {
    "int_type": "{param} must be an integer, got {got}",
    "float_type": "{param} must be a finite number, got {got}",
    "finite_number": "{param} must be a finite number, got {got}",
    "bool_type": "{param} must be true or false, got {got}",
    "string_type": "{param} must be a string, got {got}",
    "model_type": "{param} must be an object, got {got}",
    "missing": "{param} is missing",
}
_TYPE_CODES = {"int_type", "float_type", "finite_number", "bool_type", "string_type", "model_type", "list_type"}
# Fields whose one sentence states the whole rule, whatever part of it was broken (an item of stop, say).
_WHOLE_FIELD = {
    "prompt": "prompt must be a string (or a list of one string); token ids are not read here: send text",
    "stop": f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters",
}
# Fields with a sentence of their own, by their place (indices as 0); str.format templates.
_AT = {
    ("messages",): 'messages must be a non-empty list, e.g. [{{"role": "user", "content": "Good morrow."}}]',
    ("stream_options",): 'stream_options must be an object such as {{"include_usage": true}}',
    ("messages", 0): "{param} must be an object with a role and a content",
    ("messages", 0, "role"): "{param} {quoted} is not a role here: use system, user or assistant",
}


def _path(loc: tuple[int | str, ...]) -> str:
    """A pydantic location as the protocol names a field: ``messages[0].content``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _from_validation(exc: ValidationError) -> RequestError:
    """The first of pydantic's errors, in field order, as one sentence naming the field (its ``param``)."""
    error = exc.errors(include_url=False)[0]
    loc, kind, ctx = tuple(error["loc"]), error["type"], error.get("ctx") or {}
    if "param" in ctx:  # a validator of ours, with its sentence and the field it names
        return bad_request(error["msg"], ctx["param"], kind)
    if "field" in ctx:  # a model's check on one of its fields: named from where the model is
        param = _path((*loc, ctx["field"]))
        return bad_request(f"{param} {error['msg']}", param, kind)
    code = "invalid_type" if kind in _TYPE_CODES else "invalid_value"
    value = None if kind == "missing" else error.get("input")  # a missing field's input is the object around it
    shape = tuple(0 if isinstance(part, int) else part for part in loc)
    if loc and loc[0] in _WHOLE_FIELD:
        return bad_request(_WHOLE_FIELD[str(loc[0])], str(loc[0]), code)
    if shape[:3] == ("messages", 0, "content"):
        param = _path(loc[:3])
        if len(loc) > 3:  # one of its parts
            return bad_request(f'{_path(loc[:4])} must be a text part, {{"type": "text", "text": "..."}}', param, code)
        return bad_request(f"{param} must be a string or a list of text parts", param, "invalid_type")
    param = _path(loc)
    sentence = _AT.get(shape) or _TYPE_SENTENCES.get(kind, "{param} is not valid here ({detail})")
    quoted = _quoted_for_error(value) if isinstance(value, str) else _json_for_error(value)
    return bad_request(sentence.format(param=param, got=_json_for_error(value), quoted=quoted, detail=error["msg"]), param, code)


RequestModel = TypeVar("RequestModel", bound=SamplingRequest)


def validate_request(model: type[RequestModel], body: dict[str, Any], config: ServeConfig) -> RequestModel:
    """``body`` as the request ``model``, checked against this server's limits; a 400 naming the field if it is not one."""
    try:
        return model.model_validate(body, context=config)
    except ValidationError as exc:
        raise _from_validation(exc) from None

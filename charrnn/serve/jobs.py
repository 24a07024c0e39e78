"""Jobs: what a checked request asks the model for, the text it reads in pieces and how to sample.

A job is made from a request body (:mod:`charrnn.serve.protocol` checks it) in a worker
thread, and run by ``charrnn.serve.app``. A chat's messages are written through the chat
template as :class:`~charrnn.generation.chat.ChatSession` writes its turns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from ..config import MAX_SEED, SampleConfig
from ..errors import ConfigError, PromptError
from ..generation.chat import ChatTemplate
from ..generation.constraints import compile_constraint
from ..generation.sampler import MAX_PROMPT_CHARS
from ..tokenizer import CharTokenizer
from .protocol import ROLES, ChatCompletionRequest, CompletionRequest, SamplingRequest, bad_request, validate_request
from .settings import ServeConfig


@dataclass
class Job:
    """What one request asks for, checked: the text to read (in pieces), how to sample, how to answer."""

    kind: str  # "chat" or "completion"
    pieces: list[str]  # read one after another; the state cache keys on them (see charrnn.serve.state_cache)
    sample: SampleConfig  # how to sample choice 0 (choice i: seeds()[i])
    n: int
    stream: bool
    include_usage: bool
    echo: str = ""  # completions with echo: the prompt, written before the text
    warnings: list[str] = field(default_factory=list)
    logprobs: int | None = None  # alternatives listed per character in the answer (None: no log-probabilities)
    best_of: int = 1  # completions: sampled, of which the n likeliest are the answer

    @property
    def seed(self) -> int:
        """The request's seed: given, or drawn and returned so that the answer can be reproduced."""
        assert self.sample.seed is not None
        return self.sample.seed

    def seeds(self) -> list[int]:
        """Choice i uses seed + i, so choice 0 of n is the answer to the same request with n = 1."""
        return [(self.seed + i) & MAX_SEED for i in range(self.n)]


_SAMPLE_FIELDS = {f.name for f in fields(SampleConfig)}
# The request fields that are SampleConfig's own, by the same names (the seed and the stops come apart).
_REQUEST_SAMPLING = sorted((_SAMPLE_FIELDS & set(SamplingRequest.model_fields)) - {"seed", "stop"})


def _sample_config(
    request: SamplingRequest, config: ServeConfig, tokenizer: CharTokenizer, length: int | None, stops: tuple[str, ...]
) -> SampleConfig:
    """The request's sampling settings, checked by SampleConfig itself, its constraint compiled; a ConfigError as the 400."""
    seed = request.seed
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & MAX_SEED  # returned, so the answer can be reproduced
    options = {name: getattr(request, name) for name in _REQUEST_SAMPLING} | {"seed": seed}
    # best_of ranks its samples by their log-probabilities: they are recorded then, listed or not.
    ranked = isinstance(request, CompletionRequest) and (request.best_of or 1) > (request.n or 1)
    wanted = request.logprobs_wanted()
    options["logprobs"] = wanted if wanted is not None else (0 if ranked else None)
    constraint = request.constraint()
    where, constraint_options = constraint if constraint is not None else (None, {})
    try:
        sample = SampleConfig.from_options(
            length=config.default_length if length is None else length, stop=stops, **options, **constraint_options
        )
        compile_constraint(tokenizer, sample)  # a constraint it cannot compile is refused before anything is read
        return sample
    except ConfigError as exc:
        message = str(exc)
        name = message.split(" ", 1)[0]  # SampleConfig's errors start with the field they are about
        if name in ("regex", "choices", "json_schema"):
            raise bad_request(f"{where}: {message}", where) from None
        param = "max_tokens" if name == "length" else name if name in _SAMPLE_FIELDS else None
        raise bad_request(message, param) from None


def _check_text(tokenizer: CharTokenizer, text: str, what: str, warnings: list[str]) -> None:
    try:
        unknown = tokenizer.check_known(text, what)
    except PromptError as exc:
        raise bad_request(str(exc), what) from None
    if unknown:
        note = tokenizer.unknown_note(unknown)
        if note not in warnings:
            warnings.append(note)


def _check_size(pieces: list[str], limit: int, what: str, param: str) -> None:
    """The whole request's text within ``limit`` characters: its reading time is bounded, however it is split."""
    total = sum(map(len, pieces))
    if total > limit:
        raise bad_request(
            f"{what} has {total:,} characters in all; this server reads at most {limit:,} per request. A char-RNN "
            "remembers far less than that: send the last part of the text",
            param,
        )


def _usage_wanted(request: SamplingRequest) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)


def completion_job(
    body: dict[str, Any], config: ServeConfig, tokenizer: CharTokenizer, max_prompt_chars: int = MAX_PROMPT_CHARS
) -> Job:
    """A ``POST /v1/completions`` body as a job (400 on anything wrong, naming the field)."""
    request: CompletionRequest = validate_request(CompletionRequest, body, config)
    warnings = request.ignored()
    prompt = request.prompt or ""
    _check_size([prompt], max_prompt_chars, "the prompt", "prompt")
    _check_text(tokenizer, prompt, "prompt", warnings)
    sample = _sample_config(request, config, tokenizer, request.max_tokens, tuple(request.stop or ()))
    echo = prompt if request.echo else ""
    pieces = [prompt] if prompt else []
    n = request.n or 1
    return Job(
        "completion",
        pieces,
        sample,
        n,
        bool(request.stream),
        _usage_wanted(request),
        echo,
        warnings,
        logprobs=request.logprobs,
        best_of=request.best_of or n,
    )


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


def chat_job(
    body: dict[str, Any],
    config: ServeConfig,
    tokenizer: CharTokenizer,
    template: ChatTemplate,
    max_prompt_chars: int = MAX_PROMPT_CHARS,
) -> Job:
    """A ``POST /v1/chat/completions`` body as a job (400 on anything wrong, naming the field)."""
    request: ChatCompletionRequest = validate_request(ChatCompletionRequest, body, config)
    warnings = request.ignored()
    turns = []
    for i, message in enumerate(request.messages):
        text = message.text
        if text:
            _check_text(tokenizer, text, f"messages[{i}].content", warnings)
        turns.append((ROLES[message.role], text))
    # max_completion_tokens, the newer name, wins when both are given.
    length = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    # The reply ends where the model starts a new turn, and at the client's own stops too.
    stops = tuple(dict.fromkeys(template.stops + tuple(request.stop or ())))
    pieces = chat_pieces(template, turns)
    # The whole conversation is bounded, not each message: thirty thousand short ones cost what one long one does.
    _check_size(pieces, max_prompt_chars, "the conversation (with the chat template)", "messages")
    sample = _sample_config(request, config, tokenizer, length, stops)
    n, stream = request.n or 1, bool(request.stream)
    return Job("chat", pieces, sample, n, stream, _usage_wanted(request), "", warnings, logprobs=request.logprobs_wanted())

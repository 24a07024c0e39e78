"""Structured outputs: text that must match a regex, be one of some choices, or fit a JSON schema.

At character level a constraint is a mask over the vocabulary at each step. The masks
come from `llguidance <https://github.com/guidance-ai/llguidance>`_, the engine behind
the structured outputs of OpenAI's API, vLLM, SGLang and llama.cpp; charrnn only hands
it the vocabulary, one character per token. It was chosen over the other two libraries
that compile constraints to automata over a vocabulary:

- outlines-core builds the whole automaton of a regex over the vocabulary before the
  first step, and nothing bounds that build: ``(a|b)*a(a|b){20}`` has millions of states;
- xgrammar needs transformers, triton and pydantic beside torch;
- llguidance builds its lexer lazily (regex derivatives, so ``(a+)+b`` costs what ``a+b``
  does), bounds every step by fuel and by states (:data:`LIMITS`), reads JSON schemas
  itself, depends on nothing, and drops the GIL while it compiles.

A char-RNN has no end-of-text token, so a constrained text ends in one of two ways: when
the constraint allows nothing more (the JSON object closed, the choice written), or,
where it could end but also go on, when the model would rather write a character the
constraint forbids: the end then has the probability of all those characters together.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import llguidance
import numpy as np
import torch

from ..config import SampleConfig
from ..errors import CharRNNError, ConfigError
from ..tokenizer import CharTokenizer

# Bounds on one compile and one step (llguidance measures work in "fuel": about 50k a ms to
# build, 14k a ms per step), so a hostile pattern or schema is refused in milliseconds.
LIMITS = {
    "initial_lexer_fuel": 2_000_000,  # about 40 ms of building the lexer's first regexes
    "step_lexer_fuel": 400_000,  # about 30 ms per character at the very worst
    "max_lexer_states": 50_000,  # 1-2 kB each: at most about 100 MB
    "max_grammar_size": 200_000,  # symbols in the grammar a JSON schema becomes
}
# JSON as the model's training texts write it: no free whitespace (a char model would fill it
# with newlines), one space after a comma and a colon.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_JSON_PUNCTUATION = '{}":,'  # what any JSON object needs


class ConstraintError(CharRNNError):
    """A constraint that cannot go on mid-text: the next character it needs is one the model
    never saw, or a step ran past :data:`LIMITS`; ``what`` is the option that gave it
    (``regex``, ``choices``, ``json_schema``)."""

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what


class _Vocabulary:
    """The tokenizer llguidance reads: token i is character i's UTF-8; ``<unk>`` and the end are special tokens."""

    def __init__(self, tokenizer: CharTokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id = len(tokenizer)  # one past the characters: the end of the text
        self.bos_token_id = None
        self.special_token_ids = [0, self.eos_token_id]
        self.tokens = [b"\xff[unk]", *(ch.encode("utf-8") for ch in tokenizer.chars[1:]), b"\xff[end]"]

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", errors="replace")).tolist()


class Constraint:
    """A constraint compiled for one vocabulary: ``what`` names it in errors (``regex``, ...)."""

    def __init__(self, grammar: str, vocabulary: llguidance.LLTokenizer, size: int, what: str):
        self.grammar, self.vocabulary, self.size, self.what = grammar, vocabulary, size, what

    def matcher(self) -> llguidance.LLMatcher:
        """A new matcher at the start of the text."""
        return llguidance.LLMatcher(self.vocabulary, self.grammar, log_level=0, limits=llguidance.LLParserLimits(**LIMITS))


def _as_regex(choices: tuple[str, ...]) -> str:
    """An alternation of the choices as literals: every character not a letter or digit as ``\\x{HEX}``."""
    return "|".join("".join(ch if ch.isascii() and ch.isalnum() else f"\\x{{{ord(ch):X}}}" for ch in c) for c in choices)


def _schema_strings(schema: Any) -> list[str]:
    """The literal strings a schema makes the text hold: property names, required names, enum and const strings."""
    found, stack = [], [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "properties" and isinstance(value, dict):
                    found.extend(value)
                elif key in ("enum", "required") and isinstance(value, list):
                    found.extend(v for v in value if isinstance(v, str))
                elif key == "const" and isinstance(value, str):
                    found.append(value)
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _check_known(tokenizer: CharTokenizer, texts: list[str], what: str) -> None:
    """Refuse a constraint whose own literal text holds a character the model cannot write."""
    for text in texts:
        unknown = tokenizer.unknown_chars(text)
        if unknown:
            where = "for JSON's punctuation" if text == _JSON_PUNCTUATION else f"in {ascii(text[:40])}"
            raise ConfigError(
                f"{what} needs {ascii(unknown[0])} ({where}), a character this model never saw, so it "
                "cannot write it: leave it out of the constraint or use a model trained on text that has it"
            )


def _grammar(tokenizer: CharTokenizer, config: SampleConfig) -> tuple[str, str]:
    """(what, llguidance grammar) of the config's constraint, its literal characters checked."""
    if config.choices:
        _check_known(tokenizer, list(config.choices), "choices")
        return "choices", llguidance.LLMatcher.grammar_from_regex(_as_regex(config.choices))
    if config.regex:
        return "regex", llguidance.LLMatcher.grammar_from_regex(config.regex)
    try:
        schema = json.loads(config.json_schema or "")
    except ValueError:
        raise ConfigError('json_schema is not JSON: give a JSON schema, e.g. {"type": "object"}') from None
    if not isinstance(schema, dict):
        raise ConfigError('json_schema must be a JSON object (a schema), e.g. {"type": "object"}')
    _check_known(tokenizer, [_JSON_PUNCTUATION, *_schema_strings(schema)], "json_schema")
    return "json_schema", llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)


def compile_constraint(tokenizer: CharTokenizer, config: SampleConfig) -> Constraint | None:
    """The config's constraint compiled for ``tokenizer`` (None without one), or a ConfigError naming the field.

    Compiled once per vocabulary and constraint (the last few are kept), under :data:`LIMITS`.
    """
    if not config.constrained:
        return None
    return _compiled(tokenizer, config.regex, config.choices, config.json_schema)


@functools.lru_cache(maxsize=32)
def _compiled(tokenizer: CharTokenizer, regex: str | None, choices: tuple[str, ...], json_schema: str | None) -> Constraint:
    config = SampleConfig(regex=regex, choices=choices, json_schema=json_schema)
    what, grammar = _grammar(tokenizer, config)
    vocabulary = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer)), slices=[])
    constraint = Constraint(grammar, vocabulary, len(tokenizer), what)
    matcher = constraint.matcher()
    if matcher.is_error():
        raise ConfigError(f"{what} cannot be used: {_reason(matcher.get_error())}")
    if not _mask(matcher, len(tokenizer))[0].any():
        raise ConfigError(f"{what} cannot start with any character this model knows: check it against the model's vocabulary")
    return constraint


def _reason(error: str) -> str:
    """llguidance's error, shortened to its point: the regex parser's own line where it gave one."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("error:")), lines[0] if lines else "unknown error")
    return ascii(detail.removeprefix("error:").strip()[:300])[1:-1]


def _mask(matcher: llguidance.LLMatcher, size: int) -> tuple[np.ndarray, bool]:
    """The characters the matcher allows next (bool, (size,)) and whether the text may end here."""
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    allowed = bits[: size + 1].astype(bool)
    allowed[0] = False  # <unk> stands for no character in particular: it never satisfies a constraint
    return allowed[:size], bool(allowed[size])


class Guide:
    """The matchers of B streams under one constraint: the masks of their next characters, and what they wrote."""

    def __init__(self, constraint: Constraint, streams: int, tokenizer: CharTokenizer):
        self.constraint, self.tokenizer = constraint, tokenizer
        self.matchers = [constraint.matcher() for _ in range(streams)]
        self.written = [""] * streams  # the last characters, for the error that names where a constraint got stuck

    def masks(self, active: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """(allowed (B, V) bool, may end (B,) bool); a stream not ``active`` allows everything and never ends."""
        size = self.constraint.size
        allowed = np.ones((len(self.matchers), size), dtype=bool)
        end = np.zeros(len(self.matchers), dtype=bool)
        for i, matcher in enumerate(self.matchers):
            if not active[i]:
                continue
            allowed[i], end[i] = _mask(matcher, size)
            if matcher.is_error():
                what = self.constraint.what
                raise ConstraintError(f"{what} went past its limits: {matcher.get_error()[:200]}", what)
            if not allowed[i].any() and not end[i]:
                raise ConstraintError(
                    f"{self.constraint.what} cannot go on after {ascii(self.written[i])}: the next character it "
                    "needs is one this model never saw; leave it out of the constraint or use a model that knows it",
                    self.constraint.what,
                )
        return torch.from_numpy(allowed), torch.from_numpy(end)

    def consume(self, stream: int, token: int) -> bool:
        """Stream ``stream`` wrote character ``token``; whether its constraint now allows nothing more."""
        matcher = self.matchers[stream]
        matcher.consume_token(token)
        self.written[stream] = (self.written[stream] + self.tokenizer.decode((token,)))[-40:]
        return matcher.is_stopped()

"""The server's settings: one typed, validated dataclass (no third-party imports).

Kept apart from ``charrnn.serve.app`` so that ``charrnn serve --help`` and a setting's
check work without the ``serve`` extra (Starlette, uvicorn, pydantic) installed. Each
field's ``help`` is the command-line help of its flag (``--kebab-case``). Errors name
fields (``max_length``), as a library caller writes them; ``charrnn serve`` reports them
as its flags (``--max-length``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import SAMPLE_DEFAULTS
from ..config import field_help as _help
from ..errors import ConfigError

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServeConfig:
    """Where the server listens, who may call it, and the limits that keep it answering."""

    host: str = field(
        default="127.0.0.1", metadata=_help("address to bind; anything but 127.0.0.1 opens the model to the network")
    )
    port: int = field(default=8000, metadata=_help("port to listen on (0: any free port)"))
    api_key: str | None = field(
        default=None,
        metadata=_help("require 'Authorization: Bearer KEY' on /v1/ (default: $CHARRNN_API_KEY; unset: anyone on the host)"),
    )
    cors_origin: tuple[str, ...] = field(
        default=(), metadata=_help("let pages from this origin call the API (repeatable; * for any)", cli=False)
    )
    allowed_host: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "also answer requests whose Host is this name (repeatable; * for any); by default only IP addresses "
            "and localhost names are answered, so a web page cannot reach the server by DNS rebinding",
            cli=False,
        ),
    )
    model_name: str | None = field(default=None, metadata=_help("the model id /v1/models lists (default: the run's folder)"))
    max_length: int = field(default=2000, metadata=_help("most characters one reply may have (max_tokens above it: 400)"))
    default_length: int | None = field(
        default=None,
        metadata=_help(
            f"characters of a reply when max_tokens is not given (default: {SAMPLE_DEFAULTS.length}, at most --max-length)"
        ),
    )
    max_n: int = field(default=4, metadata=_help("most choices (n) one request may ask for"))
    max_body_bytes: int = field(default=MIB, metadata=_help("largest request body accepted (413 above it)"))
    max_concurrent: int = field(default=4, metadata=_help("generations running at once"))
    max_queue: int = field(default=32, metadata=_help("requests waiting for a generation slot; more get 429"))
    queue_timeout: float = field(default=30.0, metadata=_help("seconds a request waits for a slot before a 503"))
    request_timeout: float = field(
        default=60.0, metadata=_help("total seconds for one request: headers, body, wait, reply (then cut off)")
    )
    cache_entries: int = field(default=1024, metadata=_help("conversation states kept (0: no state cache)"))
    cache_bytes: int = field(default=64 * MIB, metadata=_help("bytes of conversation states kept"))
    backlog: int = field(default=2048, metadata=_help("connections the kernel queues before the server accepts them"))
    quiet: bool = field(default=False, metadata=_help("do not log each request"))

    def __post_init__(self) -> None:
        if self.default_length is None:  # the sampling default, within this server's limit
            object.__setattr__(self, "default_length", min(SAMPLE_DEFAULTS.length, self.max_length))
        checks = (
            (0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}"),
            (self.max_length >= 1, f"max_length must be at least 1, got {self.max_length}"),
            (
                0 <= self.default_length <= self.max_length,
                f"default_length {self.default_length} must be in [0, max_length {self.max_length}]",
            ),
            (self.max_n >= 1, f"max_n must be at least 1, got {self.max_n}"),
            (self.max_body_bytes >= 1024, f"max_body_bytes must be at least 1024, got {self.max_body_bytes}"),
            (self.max_concurrent >= 1, f"max_concurrent must be at least 1, got {self.max_concurrent}"),
            (self.max_queue >= 0, f"max_queue must be >= 0, got {self.max_queue}"),
            (
                math.isfinite(self.queue_timeout) and self.queue_timeout > 0,
                f"queue_timeout must be a positive number of seconds, got {self.queue_timeout}",
            ),
            (
                math.isfinite(self.request_timeout) and self.request_timeout > 0,
                f"request_timeout must be a positive number of seconds, got {self.request_timeout}",
            ),
            (self.cache_entries >= 0, f"cache_entries must be >= 0 (0: no cache), got {self.cache_entries}"),
            (self.cache_bytes >= 0, f"cache_bytes must be >= 0, got {self.cache_bytes}"),
            (self.backlog >= 1, f"backlog must be at least 1, got {self.backlog}"),
            (self.api_key is None or self.api_key.strip() != "", "api_key must not be empty: give a key or leave it out"),
            (
                self.api_key is None or (self.api_key.isascii() and self.api_key.isprintable() and " " not in self.api_key),
                "api_key must be printable ASCII without spaces (an HTTP header carries nothing else): choose another key",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if not isinstance(self.cors_origin, tuple) or not all(isinstance(o, str) and o for o in self.cors_origin):
            raise ConfigError("cors_origin must be an origin such as http://localhost:3000, or *")
        if not isinstance(self.allowed_host, tuple) or not all(
            isinstance(h, str) and h and h.isascii() and ":" not in h and "/" not in h for h in self.allowed_host
        ):
            raise ConfigError("allowed_host must be a host name such as charrnn.example.org (no port, no scheme), or *")

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the server."""
        return self.host in ("127.0.0.1", "localhost", "::1")

"""The OpenAI protocol's answers: a job's texts as ``chat.completion`` / ``text_completion``
bodies, its pieces as stream chunks, and the server-sent events that carry them.

Like ``charrnn.serve.protocol`` (the requests), nothing here knows about HTTP.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..generation.processors import TokenLogprob
from .jobs import Job


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
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()  # an echoed prompt's, its first None

    @property
    def prompt(self) -> str:
        """A completion's prompt (its text offsets count from its start)."""
        return "".join(self.job.pieces) if self.job.kind == "completion" else ""

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

    def _logprobs(self, records: Sequence[TokenLogprob | None], offset: int) -> dict[str, Any] | None:
        """A choice's ``logprobs`` object (None when not asked for); ``offset``: where its first
        character stands in the prompt and completion together (completions' ``text_offset``)."""
        if self.job.logprobs is None:
            return None
        if self.job.kind == "chat":
            return {"content": [_chat_logprob(r) for r in records if r is not None], "refusal": None}
        offsets = list(range(offset, offset + len(records)))
        return {
            "tokens": [self.job.echo[0] if r is None else r.char for r in records],
            "token_logprobs": [None if r is None else r.logprob for r in records],
            "top_logprobs": [None if r is None else dict(r.top) for r in records],
            "text_offset": offsets,
        }

    def body(
        self, texts: list[str], reasons: list[str | None], logprobs: list[list[TokenLogprob]] | None = None
    ) -> dict[str, Any]:
        """The whole answer: ``chat.completion`` or ``text_completion``."""
        logprobs = logprobs or [[] for _ in texts]
        if self.job.kind == "chat":
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "finish_reason": r,
                    "logprobs": self._logprobs(lp, 0),
                }
                for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))
            ]
            head = self._head("chat.completion")
        else:
            echo, start = self.job.echo, 0 if self.job.echo else len(self.prompt)
            choices = [
                {
                    "index": i,
                    "text": echo + t,
                    "finish_reason": r,
                    "logprobs": self._logprobs([*self.prompt_logprobs, *lp], start),
                }
                for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))
            ]
            head = self._head("text_completion")
        body = {**head, "choices": choices, "usage": self.usage(sum(len(t) for t in texts))}
        return {**body, "seed": self.job.seed, "warnings": self.job.warnings}

    def chunk(
        self,
        index: int,
        text: str | None,
        reason: str | None = None,
        first: bool = False,
        logprobs: Sequence[TokenLogprob] = (),
        offset: int = 0,
    ) -> dict[str, Any]:
        """One streamed piece (or, with ``reason``, a choice's end): ``chat.completion.chunk`` / ``text_completion``.

        ``offset``: the characters of the choice streamed before this piece. A completion
        that echoes its prompt opens with it.
        """
        if self.job.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": self._logprobs(logprobs, 0)}
            chunk = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            records: list[TokenLogprob | None] = list(logprobs)
            start = len(self.prompt) + offset  # the completion's characters follow the prompt's
            if first and self.job.echo:
                text, records, start = self.job.echo + (text or ""), [*self.prompt_logprobs, *records], 0
            choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": self._logprobs(records, start)}
            chunk = {**self._head("text_completion"), "choices": [choice]}
        if first and index == 0:  # the extras once, at the start
            chunk.update(seed=self.job.seed, warnings=self.job.warnings)
        return chunk

    def usage_chunk(self, completion_chars: int) -> dict[str, Any]:
        """The last chunk of a stream that asked for ``stream_options.include_usage``: no choices, the usage."""
        object_name = "chat.completion.chunk" if self.job.kind == "chat" else "text_completion"
        return {**self._head(object_name), "choices": [], "usage": self.usage(completion_chars)}


def _chat_logprob(record: TokenLogprob) -> dict[str, Any]:
    """One character in chat's ``logprobs.content``: a token is a character, with its UTF-8 bytes."""
    top = [{"token": ch, "logprob": lp, "bytes": list(ch.encode())} for ch, lp in record.top]
    return {"token": record.char, "logprob": record.logprob, "bytes": list(record.char.encode()), "top_logprobs": top}


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: JSON`` (or ``data: [DONE]``) and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()

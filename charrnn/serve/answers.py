"""The OpenAI protocol's answers: a job's texts as ``chat.completion`` / ``text_completion``
bodies, its pieces as stream chunks, and the server-sent events that carry them.

Like ``charrnn.serve.protocol`` (the requests), nothing here knows about HTTP.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

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
        """The last chunk of a stream that asked for ``stream_options.include_usage``: no choices, the usage."""
        object_name = "chat.completion.chunk" if self.job.kind == "chat" else "text_completion"
        return {**self._head(object_name), "choices": [], "usage": self.usage(completion_chars)}


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: JSON`` (or ``data: [DONE]``) and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()

"""Scores of whole texts (``charrnn score FILE...``): nats and bits per character, each and in total.

Each text is read from a fresh state, exactly as :meth:`Sampler.score` reads it, so a
text's figure here is that method's figure. The total is the mean over every character
that was predicted (each text's first character has nothing before it, so it is not),
which weighs a long file more than a short one, as one long corpus would.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..evaluation import DYNAMIC_LR, LN2
from .sampler import Sampler


@dataclass(frozen=True)
class TextScore:
    """One text's score; ``dynamic`` only when dynamic evaluation was asked for."""

    name: str
    chars: int
    nats_per_char: float
    unknown_chars: list[str]  # distinct characters the model never saw (read as <unk>)
    unknown_count: int  # how many characters of the text those are
    dynamic_nats_per_char: float | None = None

    @property
    def bits_per_char(self) -> float:
        return self.nats_per_char / LN2

    @property
    def predicted(self) -> int:
        """Characters scored: all but the first."""
        return self.chars - 1

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["bits_per_char"] = self.bits_per_char
        if self.dynamic_nats_per_char is not None:
            values["dynamic_bits_per_char"] = self.dynamic_nats_per_char / LN2
        return values


@dataclass(frozen=True)
class ScoreReport:
    """The scores of several texts and their total."""

    texts: list[TextScore]

    def _mean(self, values: Sequence[float]) -> float:
        weights = [t.predicted for t in self.texts]
        return sum(v * w for v, w in zip(values, weights)) / sum(weights)

    @property
    def chars(self) -> int:
        return sum(t.chars for t in self.texts)

    @property
    def nats_per_char(self) -> float:
        return self._mean([t.nats_per_char for t in self.texts])

    @property
    def dynamic_nats_per_char(self) -> float | None:
        if any(t.dynamic_nats_per_char is None for t in self.texts):
            return None
        return self._mean([t.dynamic_nats_per_char for t in self.texts])  # type: ignore[misc]

    def to_dict(self) -> dict[str, Any]:
        total: dict[str, Any] = {
            "chars": self.chars,
            "nats_per_char": self.nats_per_char,
            "bits_per_char": self.nats_per_char / LN2,
            "unknown_chars": sorted({c for t in self.texts for c in t.unknown_chars}),
            "unknown_count": sum(t.unknown_count for t in self.texts),
        }
        dynamic = self.dynamic_nats_per_char
        if dynamic is not None:
            total["dynamic_nats_per_char"], total["dynamic_bits_per_char"] = dynamic, dynamic / LN2
        return {"files": [t.to_dict() for t in self.texts], "total": total}


def score_texts(
    sampler: Sampler, texts: Sequence[tuple[str, str]], dynamic: bool = False, dynamic_lr: float = DYNAMIC_LR
) -> ScoreReport:
    """Score each ``(name, text)`` with :meth:`Sampler.score` (and dynamically, with ``dynamic``).

    Characters the model never saw are counted in the report rather than warned about.
    A text too short to score, or made only of unseen characters, is a ``PromptError``
    naming it.
    """
    scores = []
    for name, text in texts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unseen characters are reported in the result instead
            static = sampler.score(text, what=name)
            dyn = sampler.score(text, dynamic=True, dynamic_lr=dynamic_lr, what=name) if dynamic else None
        ids = sampler.tokenizer.encode(text)
        scores.append(
            TextScore(
                name=name,
                chars=len(text),
                nats_per_char=static,
                unknown_chars=sampler.tokenizer.unknown_chars(text),
                unknown_count=int(np.count_nonzero(ids == 0)),
                dynamic_nats_per_char=dyn,
            )
        )
    return ScoreReport(scores)

"""Logits processors: penalties, temperature, top-k, top-p, and the one rule that picks a character.

The fused kernel applies the same rule (``csrc/step.cpp``), so a seed gives the same
uniforms, and the same text, on every path. The controls that depend on the text so far
(the penalties, a constraint's mask) or report on each pick (log-probabilities) run in
torch between the stepper's steps (:class:`Controls`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..config import MAX_SEED, SampleConfig
from ..tokenizer import CharTokenizer
from .constraints import Constraint, Guide


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th kept), -inf elsewhere."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of likeliest characters whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # ties: as the kernel
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a character if the ones before it already reach p; the first always stays.
    drop = (torch.cumsum(probs, dim=-1) - probs) >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sampling_logits(logits: torch.Tensor, config: SampleConfig) -> torch.Tensor:
    """The logits of the distribution a pick draws from, in float64: temperature, top-k and top-p
    applied; greedy keeps the logits as they are (its pick is their largest)."""
    wide = torch.float32 if logits.device.type == "mps" else torch.float64  # MPS has no float64
    if config.greedy:
        return logits.to(wide)
    return apply_top_p(apply_top_k(logits.to(wide) / config.temperature, config.top_k), config.top_p)


def pick_from(logits: torch.Tensor, config: SampleConfig, uniforms: torch.Tensor) -> torch.Tensor:
    """Next token ids (B,) from :func:`sampling_logits` (B, V): the largest when greedy, else by inverse CDF.

    Each row draws with its own uniform in [0, 1) (``uniforms``, (B,)): the first
    character whose cumulative probability, in vocabulary order, exceeds u times the
    total. The fused kernel applies the same rule, so a seed means the same uniforms on
    every path.
    """
    if config.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    picked = (cdf <= uniforms.to(cdf)[:, None] * cdf[:, -1:]).sum(dim=-1)
    # Rounding can leave the target at the very top: take the last character still allowed.
    last = probs.size(-1) - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(picked, last)


def pick_next(logits: torch.Tensor, config: SampleConfig, uniforms: torch.Tensor) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V) under temperature, top-k and top-p (see :func:`pick_from`)."""
    return pick_from(sampling_logits(logits, config), config, uniforms)


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator from ``seed``, or from fresh OS entropy when it is None."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & MAX_SEED
    return torch.Generator().manual_seed(seed)


DRY_MAX_EXPONENT = 30  # a long loop's DRY penalty stops growing here (base**30 is already decisive)


class Penalties:
    """The repetition penalties of one sampling run, over the text it generates, per stream.

    - ``frequency_penalty`` / ``presence_penalty`` (OpenAI's): minus the penalty times a
      character's count, and minus the penalty once it occurs, over all the generated text;
    - ``repetition_penalty`` (Hugging Face's): the logits of the characters of the last
      ``penalty_window`` generated ones divided by it where positive, multiplied where negative;
    - DRY: where the generated text ends with N characters that occurred before, the
      character that followed them then loses ``dry_multiplier * dry_base ** (N -
      dry_allowed_length)`` (for N >= the allowed length), over the last ``penalty_window``.

    :class:`Controls` applies them (``apply``) before each pick and tells them the picks (``push``).
    """

    def __init__(self, config: SampleConfig, streams: int, vocab: int, device: torch.device):
        self.config = config
        self.counts = torch.zeros(streams, vocab, dtype=torch.float64, device=device)
        # The window of the last generated tokens, and for each of its positions j the length of the
        # longest text before j that equals the text's end (DRY's repeat length were hist[j] picked next).
        self.history = torch.zeros(streams, 0, dtype=torch.int64, device=device)
        self.repeat = torch.zeros(streams, 0, dtype=torch.int64, device=device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, V) with the penalties of the text so far, in float64."""
        c, logits = self.config, logits.to(torch.float64)
        if c.frequency_penalty or c.presence_penalty:
            logits = logits - c.frequency_penalty * self.counts - c.presence_penalty * (self.counts > 0)
        if self.history.size(1) and c.repetition_penalty != 1:
            seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, self.history, True)
            scaled = torch.where(logits > 0, logits / c.repetition_penalty, logits * c.repetition_penalty)
            logits = torch.where(seen, scaled, logits)
        if self.history.size(1) and c.dry_multiplier:
            longest = torch.zeros_like(logits).scatter_reduce(1, self.history, self.repeat.to(logits), "amax")
            excess = (longest - c.dry_allowed_length).clamp(max=DRY_MAX_EXPONENT)
            logits = logits - torch.where(longest >= c.dry_allowed_length, c.dry_multiplier * c.dry_base**excess, 0.0)
        return logits

    def push(self, tokens: torch.Tensor) -> None:
        """Remember the picked ``tokens`` (B,)."""
        tokens = tokens.to(self.counts.device, torch.int64)
        self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(self.counts[:, :1]))
        if self.history.size(1):
            # Position j + 1 now ends a repeat one longer where the token before it is the one just picked.
            extended = torch.where(self.history == tokens[:, None], self.repeat + 1, 0)
            self.repeat = torch.cat([torch.zeros_like(extended[:, :1]), extended], dim=1)
        else:
            self.repeat = torch.zeros_like(tokens[:, None])
        self.history = torch.cat([self.history, tokens[:, None]], dim=1)
        drop = self.history.size(1) - self.config.penalty_window
        if drop > 0:
            self.history, self.repeat = self.history[:, drop:], self.repeat[:, drop:]
            self.repeat = torch.minimum(self.repeat, torch.arange(self.repeat.size(1), device=self.repeat.device))


@dataclass(frozen=True)
class TokenLogprob:
    """One generated character: its log-probability (nats) under the distribution it was drawn
    from, and the likeliest characters of that distribution with theirs (``top``, best first)."""

    char: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


class Controls:
    """The picks of a controlled run, between the stepper's steps: penalties, a constraint, log-probabilities.

    ``pick(logits, uniforms)`` lowers the logits by the penalties, masks the characters
    the constraint forbids (adding the end of the text as one more choice, see
    :mod:`~charrnn.generation.constraints`), picks as :func:`pick_next` does, and records
    each pick's log-probability and the ``config.logprobs`` likeliest alternatives, under
    the distribution it was drawn from (greedy: the model's, penalties and mask applied).
    A stream whose constraint is complete is ``ended`` at the first pick that is no longer
    its text; that pick and the later ones are placeholders, never shown.
    """

    def __init__(
        self,
        config: SampleConfig,
        streams: int,
        tokenizer: CharTokenizer,
        device: torch.device,
        constraint: Constraint | None = None,
    ):
        self.config, self.tokenizer, self.vocab = config, tokenizer, len(tokenizer)
        self.penalties = Penalties(config, streams, self.vocab, device) if config.penalized else None
        self.guide = Guide(constraint, streams, tokenizer) if constraint is not None else None
        self.logprobs: list[list[TokenLogprob]] | None = None if config.logprobs is None else [[] for _ in range(streams)]
        self.ended: list[int | None] = [None] * streams  # the pick at which each stream's constraint completed
        self.picks = 0

    @property
    def finished(self) -> bool:
        """Whether every stream's constraint is complete."""
        return all(e is not None for e in self.ended)

    def pick(self, logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """The next tokens (B,), recorded."""
        logits = self.penalties.apply(logits) if self.penalties is not None else logits.to(torch.float64)
        live = [e is None for e in self.ended]
        if self.guide is not None:
            allowed, may_end = (t.to(logits.device) for t in self.guide.masks(live))
            # The end stands for every character the constraint forbids; alone, it is certain.
            forbidden = logits.masked_fill(allowed, float("-inf")).logsumexp(-1)
            end = torch.where(may_end & ~allowed.any(-1), 0.0, forbidden.masked_fill(~may_end, float("-inf")))
            logits = torch.cat([logits.masked_fill(~allowed, float("-inf")), end[:, None]], dim=1)
        drawn = sampling_logits(logits, self.config)
        tokens = pick_from(drawn, self.config, uniforms)
        ids = tokens.tolist()
        for i, token in enumerate(ids):
            if live[i] and token == self.vocab:  # the end of a constrained text: no character
                self.ended[i], live[i], ids[i] = self.picks, False, 0
            elif live[i] and self.guide is not None and self.guide.consume(i, token):
                self.ended[i] = self.picks + 1  # nothing can follow: the text ends after this character
        if self.logprobs is not None:
            self._record(drawn, tokens, live)
        tokens = torch.tensor(ids, dtype=torch.int64, device=logits.device)  # the end is no character: a placeholder
        if self.penalties is not None:
            self.penalties.push(tokens)
        self.picks += 1
        return tokens

    def _record(self, drawn: torch.Tensor, tokens: torch.Tensor, live: list[bool]) -> None:
        assert self.logprobs is not None
        logprobs = torch.log_softmax(drawn, dim=-1)
        chosen = logprobs.gather(1, tokens[:, None].clamp(max=logprobs.size(1) - 1))[:, 0].tolist()
        k = min(self.config.logprobs or 0, self.vocab)
        top_values, top_ids = logprobs[:, : self.vocab].topk(k, dim=-1) if k else (logprobs[:, :0], tokens[:, None][:, :0])
        decode = self.tokenizer.decode
        for i, (lp, values, ids) in enumerate(zip(chosen, top_values.tolist(), top_ids.tolist())):
            if live[i]:
                top = tuple((decode((t,)), v) for t, v in zip(ids, values) if v > float("-inf"))
                self.logprobs[i].append(TokenLogprob(decode((int(tokens[i]),)), lp, top))

"""Logits processors: temperature, top-k, top-p, and the one rule that picks a character from them.

The fused kernel applies the same rule (``csrc/step.cpp``), so a seed gives the same
uniforms, and the same text, on every path.
"""

from __future__ import annotations

import os

import torch

from ..config import MAX_SEED, SampleConfig


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


def pick_next(logits: torch.Tensor, config: SampleConfig, uniforms: torch.Tensor) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V) under temperature, top-k and top-p.

    Each row draws by inverse CDF with its own uniform in [0, 1) (``uniforms``, (B,)):
    the first character whose cumulative probability, in vocabulary order, exceeds
    u times the total. The fused kernel applies the same rule, so a seed means the
    same uniforms on every path.
    """
    if config.greedy:
        return logits.argmax(dim=-1)
    wide = torch.float32 if logits.device.type == "mps" else torch.float64  # MPS has no float64
    logits = apply_top_p(apply_top_k(logits.to(wide) / config.temperature, config.top_k), config.top_p)
    probs = torch.softmax(logits, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    picked = (cdf <= uniforms.to(cdf)[:, None] * cdf[:, -1:]).sum(dim=-1)
    # Rounding can leave the target at the very top: take the last character still allowed.
    last = probs.size(-1) - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(picked, last)


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator from ``seed``, or from fresh OS entropy when it is None."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & MAX_SEED
    return torch.Generator().manual_seed(seed)

"""Validation loss over a whole split, in nats per character.

The ideal is one stateful stream over the split, every character predicted from all
that came before. A single stream runs one character at a time, though, which on a CPU
is slow (bandwidth-bound matrix-vector products). So the split is cut into ``columns``
segments that run side by side as one batch, and each segment but the first starts
reading ``warmup`` characters early without scoring them::

    split:     |------ seg 0 ------|------ seg 1 ------|------ seg 2 ------|
    column 0:  [scored............]
    column 1:               [warm-up][scored............]
    column 2:                                  [warm-up][scored............]

Every character is scored exactly once, each with at least ``warmup`` characters of
context (or all of it, near the start), which is what a single stream gives up to a
difference far below the noise of training (a test checks it against ``columns=1``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .device import autocast
from .model import CharRNN

LN2 = math.log(2)


@torch.no_grad()
def evaluate(
    model: CharRNN,
    tokens: np.ndarray,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    columns: int = 64,
    warmup: int = 256,
    chunk: int = 256,
) -> float:
    """Mean cross-entropy (nats/char) of predicting ``tokens[1:]`` from what precedes each."""
    device = torch.device(device)
    n = len(tokens) - 1  # number of predictions
    if n < 1:
        raise ValueError("evaluation needs at least two tokens")
    columns = max(1, min(columns, n // max(1, 4 * warmup) or 1))
    seg = math.ceil(n / columns)
    seg_start = np.arange(columns) * seg  # first scored position per column
    seg_end = np.minimum(seg_start + seg, n)
    feed_start = np.maximum(seg_start - warmup, 0)
    steps = int((seg_end - feed_start).max())

    was_training = model.training
    model.eval()
    hidden = None
    total, count = 0.0, 0
    try:
        for t0 in range(0, steps, chunk):
            t = np.arange(t0, min(t0 + chunk, steps))
            pos = feed_start[:, None] + t[None, :]  # (columns, time) position being read
            scored = (pos >= seg_start[:, None]) & (pos < seg_end[:, None])
            pos = np.minimum(pos, n - 1)
            # Gathered chunk by chunk: a memory-mapped split is never copied whole.
            x = torch.from_numpy(tokens[pos].astype(np.int64)).to(device)
            y = torch.from_numpy(tokens[pos + 1].astype(np.int64)).to(device)
            with autocast(device, dtype):
                logits, hidden = model(x, hidden)
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
            mask = torch.from_numpy(scored).to(device).flatten()
            total += float(losses[mask].sum(dtype=torch.float64))
            count += int(mask.sum())
    finally:
        model.train(was_training)
    assert count == n, (count, n)
    return total / count

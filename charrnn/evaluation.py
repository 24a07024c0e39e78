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

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F

from .device import autocast
from .model import CharRNN

LN2 = math.log(2)
DYNAMIC_LR = 0.1  # SGD step of dynamic evaluation: best of 0.03, 0.1, 0.3 on the end of the training split


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


def dynamic_evaluate(
    model: CharRNN,
    tokens: np.ndarray,
    device: torch.device | str = "cpu",
    lr: float = DYNAMIC_LR,
    decay: float = 0.0,
    segment: int = 64,
) -> float:
    """Mean nats/char of ``tokens[1:]`` when the model keeps learning from what it has read.

    Dynamic evaluation (Krause et al., 2018): the text is read as one stream in segments
    of ``segment`` characters; each segment is scored first, with the weights as they
    stand, and only then used for one SGD step (and, with ``decay``, a pull back toward
    the trained weights), so no character is ever predicted by weights that saw it. The
    adaptation runs on a copy: ``model`` is left exactly as it was. This is a different
    figure from :func:`evaluate`'s and is never mixed with it.
    """
    device = torch.device(device)
    n = len(tokens) - 1
    if n < 1:
        raise ValueError("evaluation needs at least two tokens")
    adapted = copy.deepcopy(model).to(device).eval()  # eval: no dropout while adapting
    trained = [p.detach().clone() for p in adapted.parameters()]
    hidden = None
    total = 0.0
    # cuDNN refuses an RNN backward in eval mode; without it torch runs the same maths.
    with torch.backends.cudnn.flags(enabled=False):
        for start in range(0, n, segment):
            stop = min(start + segment, n)
            x = torch.from_numpy(tokens[start:stop].astype(np.int64)).to(device)[None]
            y = torch.from_numpy(tokens[start + 1 : stop + 1].astype(np.int64)).to(device)[None]
            logits, hidden = adapted(x, hidden)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            total += float(loss.detach().double())  # scored before the weights learn from it
            adapted.zero_grad(set_to_none=True)
            (loss / (stop - start)).backward()
            with torch.no_grad():
                for p, p0 in zip(adapted.parameters(), trained):
                    if p.grad is not None:
                        p -= lr * p.grad
                    if decay:
                        p += decay * (p0 - p)
            hidden = hidden.detach()  # a State: truncated BPTT between segments
    return total / n

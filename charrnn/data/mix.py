"""Several corpora in fixed shares: each epoch lays their training text out afresh.

An epoch reads as many characters as the corpora hold together, ``share`` of them from
each: a corpus given more than its size is read more than once, one given less is read
a different stretch each epoch (the next one along, wrapping), so over a run it is read
evenly. Each row of the batch layout is a sequence of blocks (a few batches long), the
corpora's blocks interleaved in their shares, and each row starts that sequence at a
different place: at every column the rows are reading the corpora in their shares, so
every batch, and under DDP every process's block of rows, sees the mix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .parts import TokenParts, Tokens


def interleaved(counts: Sequence[int]) -> np.ndarray:
    """Corpus ids, ``counts[i]`` of id i, spread as evenly as they go (the one furthest behind its share next)."""
    total, placed, order = sum(counts), [0] * len(counts), []
    for k in range(total):
        i = max(range(len(counts)), key=lambda c: counts[c] * (k + 1) / total - placed[c])
        placed[i] += 1
        order.append(i)
    return np.array(order, dtype=np.int64)


class Mix:
    """The training text of several corpora in the shares ``shares`` (normalised to sum 1)."""

    def __init__(self, parts: Sequence[Tokens], shares: Sequence[float]):
        total = float(sum(shares))
        self.parts, self.shares = list(parts), [s / total for s in shares]

    def __len__(self) -> int:
        """Characters an epoch reads: all the corpora hold."""
        return sum(len(p) for p in self.parts)

    def blocks(self, rows: int, block: int) -> tuple[int, np.ndarray]:
        """The block length and the row pattern (corpus ids, block by block) of a layout of ``rows`` rows."""
        block = max(1, min(block, *(len(p) for p in self.parts if len(p))))
        per_row = max(1, len(self) // rows // block)
        counts = [max(1, round(share * per_row)) if share > 0 else 0 for share in self.shares]
        return block, interleaved(counts)

    def layout(self, epoch: int, rows: int, block: int) -> TokenParts:
        """The text of epoch ``epoch`` as ``rows`` equal rows of blocks of about ``block`` characters."""
        block, pattern = self.blocks(rows, block)
        n = len(pattern)
        rotation = (np.arange(rows) * n) // rows  # row j starts the pattern at its own place
        corpus = pattern[(np.arange(n)[None, :] + rotation[:, None]) % n].ravel()  # reading order: row by row
        sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        per_epoch = np.bincount(corpus, minlength=len(self.parts)) * block
        # Each corpus's blocks read on, in reading order, from where the last epoch stopped.
        nth = np.zeros(len(corpus), dtype=np.int64)
        for i in range(len(self.parts)):
            mine = corpus == i
            nth[mine] = np.arange(int(mine.sum()))
        start = (epoch * per_epoch[corpus] + nth * block) % np.maximum(sizes[corpus], 1)
        stop = start + block
        # A block that runs past its corpus's end goes on at its start: two segments.
        first = np.stack([corpus, start, np.minimum(stop, sizes[corpus])], axis=1)
        wrapped = np.stack([corpus, np.zeros_like(start), np.maximum(stop - sizes[corpus], 0)], axis=1)
        return TokenParts(self.parts, np.stack([first, wrapped], axis=1).reshape(-1, 3))

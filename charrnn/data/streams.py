"""Batch streams: the training split laid out as parallel rows that carry hidden state across batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CorpusError
from .mix import Mix
from .parts import Tokens

MIX_BLOCK_BATCHES = 8  # a mix's rows switch corpus every this many batches


@dataclass(frozen=True)
class StreamPosition:
    """Where a batch stream stands: which epoch, and which batch within it."""

    epoch: int = 0
    index: int = 0


class BatchStreams:
    """The corpus laid out as ``batch_size`` parallel streams, read ``seq_len`` at a time.

    Row b of an epoch is one contiguous slice of the corpus, so batch i+1 continues
    each row exactly where batch i stopped and the hidden state can carry across::

        corpus: a b c d e f g h i j k l m n o p q r s t u v w x
        rows (batch_size=3, seq_len=2, offset 0):
            row 0: a b | c d | e f | g    <- batch 0 = columns 0-1, batch 1 = 2-3, ...
            row 1: h i | j k | l m | n
            row 2: o p | q r | s t | u
        targets are the same slices shifted one character right.

    Each epoch starts at a different offset in [0, seq_len) drawn from the seed, so the
    truncation points move between epochs; the hidden state restarts at each epoch.
    ``rows`` selects a contiguous block of rows (one rank's share under DDP). ``tokens``
    may be a :class:`~charrnn.data.mix.Mix`, which lays each epoch out anew.
    """

    def __init__(self, tokens: Tokens | Mix, batch_size: int, seq_len: int, seed: int, rows: slice | None = None):
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self._layout: tuple[int, Tokens] | None = None  # a mix's layout of the epoch last read
        self.rows = rows or slice(0, batch_size)
        needed = batch_size * seq_len + seq_len
        if len(tokens) < needed:
            raise CorpusError(
                f"the training split has {len(tokens):,} characters, but batch size {batch_size} x sequence "
                f"length {seq_len} needs at least {needed:,}: use a bigger corpus or smaller "
                f"--batch-size / --seq-len"
            )

    def _offset(self, epoch: int) -> int:
        if epoch == 0:
            return 0
        # Kept to 64 bits: a large seed (up to 2**63 - 1) must not overflow at the first epoch boundary.
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 64))
        return int(torch.randint(self.seq_len, (1,), generator=g))

    def _tokens(self, epoch: int) -> Tokens:
        """The text epoch ``epoch`` reads: a mix lays its corpora out afresh each epoch."""
        if not isinstance(self.tokens, Mix):
            return self.tokens
        if self._layout is None or self._layout[0] != epoch:
            self._layout = (epoch, self.tokens.layout(epoch, self.batch_size, MIX_BLOCK_BATCHES * self.seq_len))
        return self._layout[1]

    def _row_length(self, epoch: int) -> int:
        return (len(self._tokens(epoch)) - 1 - self._offset(epoch)) // self.batch_size

    def batches_in_epoch(self, epoch: int) -> int:
        return self._row_length(epoch) // self.seq_len

    def get(self, pos: StreamPosition) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the batch at ``pos``, each (rows, seq_len) int64."""
        off, length, t = self._offset(pos.epoch), self._row_length(pos.epoch), self.seq_len
        # Row r of the layout starts at off + r * length; only this batch's windows are read.
        starts = off + np.arange(self.batch_size)[self.rows] * length + pos.index * t
        window = np.asarray(self._tokens(pos.epoch)[starts[:, None] + np.arange(t + 1)]).astype(np.int64)
        return torch.from_numpy(window[:, :-1].copy()), torch.from_numpy(window[:, 1:].copy())

    def next(self, pos: StreamPosition) -> StreamPosition:
        """The position after ``pos``; past the last batch, the start of the next epoch."""
        if pos.index + 1 < self.batches_in_epoch(pos.epoch):
            return StreamPosition(pos.epoch, pos.index + 1)
        return StreamPosition(pos.epoch + 1, 0)

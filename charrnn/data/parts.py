"""Token arrays read as one without copying: a folder's files, a split's parts, a mix's layout."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TokenParts:
    """Segments of a few token arrays (memory maps, or TokenParts themselves) read as one array.

    Supports what the batch streams and the evaluation read a split with: ``len``, a
    contiguous slice, and indexing with an integer array. Nothing is copied but what is
    read: an index finds its segment, and each base array is gathered from once per read.
    """

    def __init__(self, bases: Sequence[np.ndarray | TokenParts], segments: np.ndarray | None = None):
        """``segments``: rows of ``(base, start, stop)`` in reading order; by default, each base whole."""
        self.bases = list(bases)
        if segments is None:
            segments = np.array([(k, 0, len(b)) for k, b in enumerate(self.bases)], dtype=np.int64).reshape(-1, 3)
        kept = segments[segments[:, 2] > segments[:, 1]]
        self._base, self._from = kept[:, 0], kept[:, 1]
        self._starts = np.concatenate([[0], np.cumsum(kept[:, 2] - kept[:, 1])])
        self.dtype = np.dtype(self.bases[0].dtype) if self.bases else np.dtype(np.uint8)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("TokenParts takes contiguous slices only")
            return self._slice(start, max(start, stop))
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError("index out of range")
        segment = np.searchsorted(self._starts, index, side="right") - 1
        offset = self._from[segment] + index - self._starts[segment]
        base = self._base[segment]
        out = np.empty(index.shape, dtype=self.dtype)
        for b in np.unique(base):
            mask = base == b
            out[mask] = self.bases[b][offset[mask]]
        return out

    def _slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``start:stop``: each segment they cross read as one contiguous slice of its base."""
        pieces = []
        first = max(int(np.searchsorted(self._starts, start, side="right")) - 1, 0)
        for k in range(first, len(self._base)):
            lo, hi = max(start, int(self._starts[k])), min(stop, int(self._starts[k + 1]))
            if lo >= stop:
                break
            if hi > lo:
                offset = int(self._from[k]) - int(self._starts[k])
                pieces.append(np.asarray(self.bases[self._base[k]][offset + lo : offset + hi]))
        return np.concatenate(pieces).astype(self.dtype, copy=False) if pieces else np.empty(0, dtype=self.dtype)


Tokens = np.ndarray | TokenParts  # what a split is read through


def joined(parts: Sequence[Tokens]) -> Tokens:
    """One array where there is one part (no indirection), else :class:`TokenParts`."""
    kept = [p for p in parts if len(p)]
    return kept[0] if len(kept) == 1 else TokenParts(kept)

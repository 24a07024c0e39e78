"""Validation parts: which characters of a corpus train and which validate.

- One file (or one ``hf:`` split): its first 90% trains and its last 10% validates, cut at
  exactly 90% (nanoGPT's shakespeare_char split, so figures compare).
- A folder: the last 10% of *each* file validates, cut at the line boundary nearest 90%,
  so every file is represented in proportion to its size; the first 90% of each trains.
- With a validation source of its own (``--val-data``, or a dataset's own ``validation``
  split), the corpus trains in full and that source validates in full.

The parts are read through :class:`TokenParts`, which joins memory-mapped arrays without
copying them: memory stays what the batches and the evaluation chunks take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CorpusError
from ..tokenizer import CharTokenizer
from .corpus import hf_held_out_split
from .token_cache import EncodedCorpus, encode_corpus

TRAIN_FRACTION = 0.9
LINE_SEARCH_CHARS = 4096  # how far from 90% a folder's file may be cut to end on a line


class TokenParts:
    """Several token arrays read as one, without copying them.

    Supports what the batch streams and the evaluation read a split with: ``len``, a
    contiguous slice, and indexing with an integer array (each index finds its part).
    """

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.dtype = self.parts[0].dtype if self.parts else np.dtype(np.uint8)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("TokenParts takes contiguous slices only")
            return self[np.arange(start, stop)]
        index = np.asarray(index)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError("index out of range")
        which = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty(index.shape, dtype=self.dtype)
        for k in np.unique(which):
            mask = which == k
            out[mask] = self.parts[k][index[mask] - self.starts[k]]
        return out


Tokens = np.ndarray | TokenParts  # what a split is read through


@dataclass(frozen=True)
class Split:
    """The training and validation tokens of a run, and a phrase on what validates."""

    train: Tokens
    val: Tokens
    validates: str  # e.g. "the last 10% of each of 3 files"


def joined(parts: Sequence[np.ndarray]) -> Tokens:
    """One array where there is one part (no indirection), else :class:`TokenParts`."""
    kept = [p for p in parts if len(p)]
    return kept[0] if len(kept) == 1 else TokenParts(kept)


def piece_bounds(pieces: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each file's tokens in the corpus."""
    ends = np.cumsum(pieces).tolist()
    return list(zip([0, *ends[:-1]], ends))


def line_cut(tokens: np.ndarray, start: int, stop: int, newline: int | None) -> int:
    """Where a file's first 90% ends: just after the newline nearest 90%, or at 90% where none is near."""
    cut = start + int((stop - start) * TRAIN_FRACTION)
    if newline is None or stop - start < 2:
        return cut
    lo, hi = max(start, cut - LINE_SEARCH_CHARS), min(stop - 1, cut + LINE_SEARCH_CHARS)
    found = np.flatnonzero(np.asarray(tokens[lo:hi]) == newline)
    if not len(found):
        return cut
    nearest = lo + int(found[np.argmin(np.abs(lo + found + 1 - cut))]) + 1
    return nearest


def split_tokens(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First 90% for training, last 10% for validation (the nanoGPT shakespeare_char split)."""
    n = int(len(tokens) * TRAIN_FRACTION)
    return tokens[:n], tokens[n:]


def split_corpus(tokens: np.ndarray, pieces: Sequence[int], newline: int | None) -> Split:
    """The 90/10 split of a corpus of ``pieces`` (file lengths): see the module docstring."""
    if len(pieces) <= 1:
        return Split(*split_tokens(tokens), "its last 10%")
    train, val = [], []
    for start, stop in piece_bounds(pieces):
        cut = line_cut(tokens, start, stop, newline)
        train.append(tokens[start:cut])
        val.append(tokens[cut:stop])
    return Split(joined(train), joined(val), f"the last 10% of each of its {len(pieces)} files")


def unknown_count(tokens: Tokens) -> int:
    """How many tokens are ``<unk>`` (id 0), counted a few MB at a time (the tokens may be a huge memory map)."""
    return sum(int((tokens[i : min(i + (1 << 24), len(tokens))] == 0).sum()) for i in range(0, len(tokens), 1 << 24))


@dataclass(frozen=True)
class RunData:
    """What a run trains and validates on: the split, the vocabulary, and the record ``config.json`` keeps."""

    split: Split
    corpus: EncodedCorpus  # the training corpus as encoded
    record: dict[str, Any]  # its sources, sizes and sha256s, and what validates
    notes: tuple[str, ...]  # for the user: e.g. validation characters training never saw


def _source_record(spec: str, split: str | None, encoded: EncodedCorpus) -> dict[str, Any]:
    return {
        "source": spec,
        **({"split": split} if spec.startswith("hf:") else {}),
        "chars": len(encoded.tokens),
        "files": len(encoded.pieces),
        "sha256": encoded.sha256,
    }


def read_run_data(
    data: str,
    hf_split: str = "train",
    hf_column: str | None = None,
    val_data: str | None = None,
    tokenizer: CharTokenizer | None = None,
    max_vocab: int = 0,
    grow_from: CharTokenizer | None = None,
) -> RunData:
    """Encode ``data`` (see :func:`~charrnn.data.token_cache.encode_corpus` for the vocabulary
    arguments) and choose what validates: ``val_data`` in full when given, else an ``hf:``
    dataset's own held-out split, else the last 10% (of each file, for a folder)."""
    corpus = encode_corpus(data, hf_split, hf_column, tokenizer, max_vocab, grow_from)
    record: dict[str, Any] = {"sources": [_source_record(data, hf_split, corpus)]}
    held_out = hf_held_out_split(data[3:], hf_split) if data.startswith("hf:") and val_data is None else None
    if val_data is None and held_out is None:
        newline = int(corpus.tokenizer.encode("\n")[0]) if "\n" in corpus.tokenizer else None
        split = split_corpus(corpus.tokens, corpus.pieces, newline)
        record["validation"] = {"source": data, "part": split.validates}
        return RunData(split, corpus, record, ())
    spec = val_data if val_data is not None else data
    split_name = held_out or (hf_held_out_split(spec[3:], "") or "train" if spec.startswith("hf:") else "train")
    what = f"--val-data {spec}" if val_data is not None else f"the {split_name!r} split of {spec}"
    try:
        val = encode_corpus(spec, split_name, hf_column, tokenizer=corpus.tokenizer)
    except CorpusError as exc:
        raise CorpusError(f"{what}: {exc}") from None
    if len(val.tokens) < 2:
        raise CorpusError(f"{what} has {len(val.tokens)} characters: a validation text needs at least 2")
    unknown = unknown_count(val.tokens)
    if unknown == len(val.tokens):
        raise CorpusError(
            f"{what} shares no character with the training text {data!r}: every one would read as <unk>. "
            "Give a validation text in the training text's language and script"
        )
    notes = (
        (
            f"note: {unknown:,} characters of {what} ({unknown / len(val.tokens):.2%}) never occur in the training "
            "text and read as <unk>; they count in the validation loss",
        )
        if unknown
        else ()
    )
    split = Split(corpus.tokens, val.tokens, f"all of {what}")
    record["validation"] = {**_source_record(spec, split_name, val), "part": "all of it", "unknown_chars": unknown}
    return RunData(split, corpus, record, notes)

"""Validation parts: which characters of a corpus train and which validate.

- One file (or one ``hf:`` split): its first 90% trains and its last 10% validates, cut at
  exactly 90% (nanoGPT's shakespeare_char split, so figures compare).
- A folder: the last 10% of *each* file validates, cut at the line boundary nearest 90%,
  so every file is represented in proportion to its size; the first 90% of each trains.
- With a validation source of its own (``--val-data``, or a dataset's own ``validation``
  split), the corpus trains in full and that source validates in full.

The parts are read through :class:`~charrnn.data.parts.TokenParts`, which joins
memory-mapped arrays without copying them: memory stays what the batches and the
evaluation chunks take.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CorpusError
from ..tokenizer import CharTokenizer
from .corpus import hf_held_out_split
from .mix import Mix
from .parts import Tokens, joined
from .token_cache import EncodedCorpus, encode_corpus, grown_vocabulary

TRAIN_FRACTION = 0.9
LINE_SEARCH_CHARS = 4096  # how far from 90% a folder's file may be cut to end on a line


@dataclass(frozen=True)
class Split:
    """The training and validation tokens of a run, and a phrase on what validates."""

    train: Tokens
    val: Tokens
    validates: str  # e.g. "the last 10% of each of 3 files"


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
    return lo + int(found[np.argmin(np.abs(lo + found + 1 - cut))]) + 1


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
    """What a run trains and validates on, with its vocabulary and the record ``config.json`` keeps."""

    train: Tokens | Mix
    val: Tokens  # all the validation text, one stream
    val_parts: tuple[tuple[str, Tokens], ...]  # each corpus's own validation text, when several validate
    validates: str  # a phrase on what validates, e.g. "the last 10% of each of its 3 files"
    tokenizer: CharTokenizer
    corpus_tokens: Tokens  # all the training corpora, whole (for the vocabulary notes of a fine-tuned run)
    record: dict[str, Any]  # the sources, their shares, sizes and sha256s, and what validates
    notes: tuple[str, ...] = ()  # for the user: e.g. validation characters training never saw


def _source_record(spec: str, split: str | None, encoded: EncodedCorpus) -> dict[str, Any]:
    return {
        "source": spec,
        **({"split": split} if spec.startswith("hf:") else {}),
        "chars": len(encoded.tokens),
        "files": len(encoded.pieces),
        "sha256": encoded.sha256,
    }


def _held_out(spec: str, train_split: str) -> str | None:
    return hf_held_out_split(spec[3:], train_split) if spec.startswith("hf:") else None


def _character_counts(corpus: EncodedCorpus) -> Counter:
    """How often each character occurs in an encoded corpus, counted a few MB at a time."""
    counts = np.zeros(corpus.tokenizer.vocab_size, dtype=np.int64)
    for i in range(0, len(corpus.tokens), 1 << 24):
        counts += np.bincount(np.asarray(corpus.tokens[i : i + (1 << 24)]), minlength=len(counts))
    return Counter({corpus.tokenizer.chars[k]: int(n) for k, n in enumerate(counts) if n and k})


def _shared_vocabulary(
    sources: Sequence[str], hf_split: str, hf_column: str | None, max_vocab: int, grow_from: CharTokenizer | None
) -> CharTokenizer:
    """One vocabulary for several corpora: their characters counted together (each corpus's own cache counts it)."""
    counts: Counter = Counter()
    for spec in sources:
        counts.update(_character_counts(encode_corpus(spec, hf_split, hf_column)))
    if grow_from is not None:
        return grown_vocabulary(grow_from, counts, max_vocab)
    return CharTokenizer.from_counts(counts, max_vocab)


def _validation_source(
    spec: str, split_name: str, hf_column: str | None, what: str, tokenizer: CharTokenizer, trained_on: str
) -> tuple[EncodedCorpus, int, tuple[str, ...]]:
    """A validation text of its own, read with the training vocabulary: it, its unknown count, and a note."""
    try:
        val = encode_corpus(spec, split_name, hf_column, tokenizer=tokenizer)
    except CorpusError as exc:
        raise CorpusError(f"{what}: {exc}") from None
    if len(val.tokens) < 2:
        raise CorpusError(f"{what} has {len(val.tokens)} characters: a validation text needs at least 2")
    unknown = unknown_count(val.tokens)
    if unknown == len(val.tokens):
        raise CorpusError(
            f"{what} shares no character with the training text {trained_on}: every one would read as <unk>. "
            "Give a validation text in the training text's language and script"
        )
    note = (
        f"note: {unknown:,} characters of {what} ({unknown / len(val.tokens):.2%}) never occur in the training "
        "text and read as <unk>; they count in the validation loss"
    )
    return val, unknown, (note,) if unknown else ()


def read_run_data(
    data: str | Sequence[str],
    hf_split: str = "train",
    hf_column: str | None = None,
    val_data: str | None = None,
    mix: Sequence[float] | None = None,
    tokenizer: CharTokenizer | None = None,
    max_vocab: int = 0,
    grow_from: CharTokenizer | None = None,
) -> RunData:
    """Encode the corpora ``data`` (one or several) and choose what trains and what validates.

    Validation is ``val_data`` in full when given, else each corpus's own: an ``hf:``
    dataset's held-out split, or its last 10% (of each file, for a folder). Several corpora
    share one vocabulary; with ``mix``, training draws those shares of characters from them
    (a :class:`~charrnn.data.mix.Mix`), else reads them as one concatenation. For the
    vocabulary arguments see :func:`~charrnn.data.token_cache.encode_corpus`.
    """
    sources = [data] if isinstance(data, str) else list(data)
    if len(sources) > 1 and tokenizer is None:
        tokenizer, max_vocab, grow_from = _shared_vocabulary(sources, hf_split, hf_column, max_vocab, grow_from), 0, None
    corpora = [encode_corpus(spec, hf_split, hf_column, tokenizer, max_vocab, grow_from) for spec in sources]
    vocabulary = corpora[0].tokenizer
    newline = int(vocabulary.encode("\n")[0]) if "\n" in vocabulary else None
    shares = list(mix) if mix is not None else [len(c.tokens) for c in corpora]
    total = float(sum(shares))
    records = [
        {**_source_record(spec, hf_split, c), **({"share": round(p / total, 6)} if len(sources) > 1 else {})}
        for spec, c, p in zip(sources, corpora, shares)
    ]
    trained_on = " + ".join(map(repr, sources))
    train_parts, val_parts, notes, validation = [], [], [], []
    for spec, corpus in zip(sources, corpora):
        held_out = _held_out(spec, hf_split) if val_data is None else None
        if val_data is not None:
            train_parts.append(corpus.tokens)
        elif held_out is not None:
            what = f"the {held_out!r} split of {spec}"
            val, unknown, note = _validation_source(spec, held_out, hf_column, what, vocabulary, trained_on)
            train_parts.append(corpus.tokens)
            val_parts.append((spec, val.tokens))
            notes += note
            validation.append({**_source_record(spec, held_out, val), "part": "all of it", "unknown_chars": unknown})
        else:
            split = split_corpus(corpus.tokens, corpus.pieces, newline)
            train_parts.append(split.train)
            val_parts.append((spec, split.val))
            validation.append({"source": spec, "part": split.validates})
    if val_data is not None:
        name = _held_out(val_data, "") or "train"
        what = f"--val-data {val_data}"
        val, unknown, note = _validation_source(val_data, name, hf_column, what, vocabulary, trained_on)
        val_parts, notes = [(val_data, val.tokens)], list(note)
        validation = [{**_source_record(val_data, name, val), "part": "all of it", "unknown_chars": unknown}]
        validates = f"all of {what}"
    elif len(sources) == 1:
        validates = validation[0]["part"] if "chars" not in validation[0] else f"all of the {held_out!r} split of {sources[0]}"
    else:
        validates = f"the validation part of each of its {len(sources)} corpora"
    train: Tokens | Mix = Mix(train_parts, shares) if mix is not None and len(sources) > 1 else joined(train_parts)
    record = {"sources": records, "validation": validation[0] if len(validation) == 1 else validation}
    return RunData(
        train=train,
        val=joined([v for _, v in val_parts]),
        val_parts=tuple(val_parts) if len(val_parts) > 1 else (),
        validates=validates,
        tokenizer=vocabulary,
        corpus_tokens=joined([c.tokens for c in corpora]),
        record=record,
        notes=tuple(notes),
    )

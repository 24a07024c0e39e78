"""Token files: a corpus is encoded once, and every later run memory-maps the result.

The first run over a corpus makes two streaming passes, a few MB at a time: one counts
the characters (the vocabulary), one encodes them into a flat file of token ids. Both
are kept in a hidden cache folder beside the corpus (``.NAME.charrnn``; under
``data/cache`` where that is not writable, and for ``hf:`` datasets), with a key made
of the corpus files' sizes and modification times and the vocabulary. A later run
whose key matches maps the file and starts training at once; a changed corpus, a
different ``--max-vocab`` or a resumed run's own vocabulary makes a new file.
Memory stays a few chunks, whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .._io import atomic_write, open_regular, read_json
from ..errors import CorpusError
from ..tokenizer import CharTokenizer, is_surrogate
from .corpus import corpus_files, data_dir, iter_hf_dataset, read_files

CACHE_VERSION = 2  # 2: each file's length and the text's sha256 are kept
TOKENS_FILE = "tokens.bin"
VOCAB_FILE = "tokenizer.json"
META_FILE = "meta.json"
_TOKEN_DTYPES = ("uint8", "uint16", "uint32")
_BAR_MIN_BYTES = 32 << 20  # smaller corpora encode in a blink: no progress bar


def _source_key(spec: str, hf_split: str, hf_column: str | None, files: list[Path]) -> tuple[dict, int]:
    """What identifies the corpus's content, and its size in bytes (0 when unknown)."""
    if spec.startswith("hf:"):
        return {"hf": spec[3:], "split": hf_split, "column": hf_column}, 0
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return {"files": stats}, sum(size for _, size, _ in stats)


def cache_folder(spec: str, hf_split: str = "train", hf_column: str | None = None, files: list[Path] | None = None) -> Path:
    """Where the token file of a corpus lives (``files``: its :func:`corpus_files`, if known)."""
    if not spec.startswith("hf:"):
        path = Path(spec).expanduser()
        corpus = path if path.is_dir() else (files or corpus_files(spec))[0]
        # Beside the corpus, unless its folder is read-only (checked on the mode bits
        # too, since root may write where nobody is meant to).
        if os.access(corpus.parent, os.W_OK) and corpus.parent.stat().st_mode & 0o222:
            return corpus.parent / f".{corpus.name}.charrnn"
    name = hashlib.sha256(f"{spec}\0{hf_split}\0{hf_column}".encode()).hexdigest()[:16]
    return data_dir() / "cache" / name


def count_characters(chunks: Iterable[str]) -> Counter:
    """How often each character occurs in a text given in chunks, in one pass."""
    counts = np.zeros(0x110000, dtype=np.int64)
    for chunk in chunks:
        codes = np.frombuffer(chunk.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        counts += np.bincount(codes, minlength=0x110000)
    present = np.flatnonzero(counts)
    return Counter({chr(int(c)): int(counts[c]) for c in present})


def grown_vocabulary(base: CharTokenizer, counts: Counter, max_vocab: int = 0) -> CharTokenizer:
    """``base``'s characters with their ids unchanged, then the counted characters it lacks.

    The old ids stay where they were, so a model's embedding and output rows keep their
    meaning and the new characters get rows appended after them. With ``max_vocab``, the
    most frequent new characters are added until the vocabulary holds that many; the rest
    read as ``<unk>``.
    """
    new = sorted((c for c in counts if c not in base and not is_surrogate(c)), key=lambda c: (-counts[c], c))
    if max_vocab:
        new = new[: max(0, max_vocab - base.vocab_size)]
    return CharTokenizer(base.chars[1:] + sorted(new))


@dataclass(frozen=True)
class EncodedCorpus:
    """A corpus as its token cache holds it.

    ``pieces`` are the token counts of its files in reading order (one piece for a file or
    an ``hf:`` split), so that each file can be split on its own; ``sha256`` is the digest
    of the UTF-8 text read (a folder's files joined as :func:`read_files` joins them).
    """

    tokens: np.ndarray
    tokenizer: CharTokenizer
    pieces: tuple[int, ...]
    sha256: str


def corpus_tokens(
    spec: str,
    hf_split: str = "train",
    hf_column: str | None = None,
    tokenizer: CharTokenizer | None = None,
    max_vocab: int = 0,
    grow_from: CharTokenizer | None = None,
) -> tuple[np.ndarray, CharTokenizer]:
    """The corpus as a read-only memory-mapped token array, and its vocabulary (see :func:`encode_corpus`)."""
    encoded = encode_corpus(spec, hf_split, hf_column, tokenizer, max_vocab, grow_from)
    return encoded.tokens, encoded.tokenizer


def encode_corpus(
    spec: str,
    hf_split: str = "train",
    hf_column: str | None = None,
    tokenizer: CharTokenizer | None = None,
    max_vocab: int = 0,
    grow_from: CharTokenizer | None = None,
) -> EncodedCorpus:
    """The corpus's token cache, encoded now unless a matching one is there.

    With ``tokenizer`` (a resumed run, or a validation text read with the training
    vocabulary), the corpus is encoded with that vocabulary; with ``grow_from`` (a
    fine-tuned run), with that vocabulary followed by the corpus's characters it lacks
    (see :func:`grown_vocabulary`); otherwise the vocabulary is the corpus's own, cut to
    ``max_vocab`` characters if set.
    """
    # A local corpus is resolved once: a folder is scanned (and its binary files reported) once.
    hf = spec.startswith("hf:")
    files = [] if hf else corpus_files(spec)
    folder_spec = not hf and Path(spec).expanduser().is_dir()

    def pieces() -> Iterator[Iterator[str]]:
        """The corpus's text, one chunk iterator per file (a folder's files each end a line)."""
        if hf:
            yield iter_hf_dataset(spec[3:], hf_split, hf_column)
        elif folder_spec:
            yield from (read_files([path], folder=True) for path in files)
        else:
            yield read_files(files, folder=False)

    def chunks() -> Iterator[str]:
        for piece in pieces():
            yield from piece

    source, total_bytes = _source_key(spec, hf_split, hf_column, files)
    if tokenizer is not None:
        vocab: object = hashlib.sha256(tokenizer.to_hf().to_str().encode()).hexdigest()
    elif grow_from is not None:
        vocab = {"grow": hashlib.sha256(grow_from.to_hf().to_str().encode()).hexdigest(), "max": max_vocab}
    else:
        vocab = max_vocab
    key = json.dumps({"version": CACHE_VERSION, "source": source, "vocab": vocab}, sort_keys=True)
    folder = cache_folder(spec, hf_split, hf_column, files)
    cached = _open_cache(folder, key)
    if cached is not None:
        return cached

    if tokenizer is None and grow_from is not None:
        tokenizer = grown_vocabulary(grow_from, count_characters(chunks()), max_vocab)
    elif tokenizer is None:
        tokenizer = CharTokenizer.from_counts(count_characters(chunks()), max_vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_FILE).unlink(missing_ok=True)  # the old cache is invalid from here on
    lengths, digest = [], hashlib.sha256()
    bar = tqdm(
        total=total_bytes or None,
        unit="B",
        unit_scale=True,
        desc="encoding corpus",
        leave=False,
        disable=None if total_bytes >= _BAR_MIN_BYTES or not total_bytes else True,
    )
    try:
        with atomic_write(folder / TOKENS_FILE) as out:
            for piece in pieces():
                lengths.append(0)
                for chunk in piece:
                    ids = tokenizer.encode(chunk)
                    out.write(ids.tobytes())
                    lengths[-1] += len(ids)
                    data = chunk.encode("utf-8", errors="surrogatepass")
                    digest.update(data)
                    if not bar.disable:
                        bar.update(len(data))
        tokenizer.save(folder / VOCAB_FILE)
        n = sum(lengths)
        meta = {
            "key": key,
            "n_tokens": n,
            "dtype": np.dtype(tokenizer.token_dtype).name,
            "pieces": lengths,
            "sha256": digest.hexdigest(),
        }
        with atomic_write(folder / META_FILE, "w", encoding="utf-8") as f:  # written last: its presence means the cache is whole
            f.write(json.dumps(meta))
    except OSError as exc:
        raise CorpusError(f"could not write the token cache in {folder}: {exc.strerror or exc}") from None
    finally:
        bar.close()
    if bar.disable is False:
        print(f"encoded {n:,} characters into {folder / TOKENS_FILE}", file=sys.stderr)
    return _open_cache(folder, key)


def _open_cache(folder: Path, key: str) -> EncodedCorpus | None:
    """The cached tokens and vocabulary, or None when the cache is missing, stale or damaged.

    A damaged cache is encoded again, never trusted: the metadata is type-checked, the
    file must be a regular one of exactly the recorded length, and every id must be in
    the vocabulary (one flipped byte would otherwise be an IndexError in every later run).
    """
    try:
        meta = read_json(folder / META_FILE)
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None
        n_tokens, dtype = meta["n_tokens"], np.dtype(meta["dtype"])
        pieces, digest = meta["pieces"], meta["sha256"]
        if type(n_tokens) is not int or n_tokens < 0 or dtype.name not in _TOKEN_DTYPES:
            raise ValueError("bad metadata")
        if not isinstance(pieces, list) or any(type(p) is not int or p < 0 for p in pieces) or sum(pieces) != n_tokens:
            raise ValueError("bad file lengths")
        if not isinstance(digest, str):
            raise ValueError("bad digest")
        tokenizer = CharTokenizer.load(folder / VOCAB_FILE)
        with open_regular(folder / TOKENS_FILE) as f:
            if os.fstat(f.fileno()).st_size != n_tokens * dtype.itemsize:
                raise ValueError("wrong length")
        tokens = np.memmap(folder / TOKENS_FILE, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
        if n_tokens and int(tokens.max()) >= tokenizer.vocab_size:
            raise ValueError("an id outside the vocabulary")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if (folder / META_FILE).exists():
            print(f"note: the token cache in {folder} is damaged ({exc}); encoding the corpus again", file=sys.stderr)
        return None  # missing or damaged: encode again
    return EncodedCorpus(tokens, tokenizer, tuple(pieces), digest)

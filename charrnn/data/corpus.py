"""Corpora: find them, check them, split them 90/10, and lay them out as batch streams.

A corpus spec is one of
- ``shakespeare``: Tiny Shakespeare, from the ``data/`` cache or downloaded and verified;
- a path to a UTF-8 text file, or to a folder (its text files, in sorted order);
- ``hf:OWNER/NAME`` (or ``hf:`` and a local dataset folder): a Hugging Face dataset.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CorpusError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9


def data_dir() -> Path:
    """The corpus cache: ``$CHARRNN_DATA_DIR`` or ``./data``."""
    return Path(os.environ.get("CHARRNN_DATA_DIR", "data"))


# --- finding and reading a corpus ------------------------------------------------

CHUNK_BYTES = 4 << 20  # read corpora this much at a time, so memory does not grow with them


def load_corpus(spec: str, hf_split: str = "train", hf_column: str | None = None) -> str:
    """The whole text of the corpus named by ``spec``, checked to be non-empty UTF-8 text."""
    return "".join(iter_corpus(spec, hf_split, hf_column))


def iter_corpus(spec: str, hf_split: str = "train", hf_column: str | None = None) -> Iterator[str]:
    """The text of a corpus in chunks of a few MB, checked as it is read (see :func:`load_corpus`)."""
    if spec.startswith("hf:"):
        yield from iter_hf_dataset(spec[3:], hf_split, hf_column)
        return
    yield from read_files(corpus_files(spec), folder=Path(spec).expanduser().is_dir())


def read_files(files: list[Path], folder: bool) -> Iterator[str]:
    """The text of ``files`` (from :func:`corpus_files`) in chunks; a folder's files each end a line."""
    if not folder:
        yield from _iter_file(files[0])
        return
    for path in files:
        last = ""
        for chunk in _iter_file(path, allow_empty=True):
            last = chunk
            yield chunk
        if last and not last.endswith("\n"):
            yield "\n"  # each file of a folder ends its own line


def _single_file(spec: str) -> Path | None:
    if spec == "shakespeare":
        return shakespeare_path()
    path = Path(spec).expanduser()
    return path if path.is_file() else None


def corpus_files(spec: str) -> list[Path]:
    """The local files a corpus spec stands for, in reading order (binary files of a folder left out)."""
    single = _single_file(spec)
    if single is not None:
        return [single]
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise CorpusError(
            f"corpus {spec!r} not found: give 'shakespeare', a path to a .txt file or folder, or hf:OWNER/NAME"
        )
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if _looks_binary(_head(path)):
            print(f"note: skipping binary file {path}", file=sys.stderr)
            continue
        if path.stat().st_size:
            files.append(path)
    if not files:
        raise CorpusError(f"folder {folder} holds no non-empty text files: add .txt files to it")
    return files


def corpus_name(spec: str) -> str:
    """A short name for run directories: 'shakespeare', 'input', 'owner-name'."""
    if spec.startswith("hf:"):
        return spec[3:].strip("/").replace("/", "-") or "hf"
    return Path(spec).stem or "corpus"


def shakespeare_path() -> Path:
    """Path of Tiny Shakespeare in the cache, downloading and verifying it if absent."""
    path = data_dir() / "shakespeare" / "input.txt"
    if path.exists():
        _verify_sha256(path, SHAKESPEARE_SHA256)
        return path
    url = os.environ.get("CHARRNN_SHAKESPEARE_URL", SHAKESPEARE_URL)
    download(url, path, SHAKESPEARE_SHA256)
    return path


def download(url: str, dest: Path, sha256: str) -> None:
    """Fetch ``url`` to ``dest`` atomically, keeping it only if its sha256 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=30) as response:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise CorpusError(
                    f"could not download Tiny Shakespeare from {url} ({exc}); put the file at {dest} "
                    f"(any copy of input.txt with sha256 {sha256}) and run again"
                ) from None
        digest = _sha256(Path(tmp))
        if digest != sha256:
            raise CorpusError(
                f"the file downloaded from {url} has sha256 {digest}, expected {sha256}; "
                f"it was not kept. Put a correct copy at {dest}"
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _verify_sha256(path: Path, expected: str) -> None:
    digest = _sha256(path)
    if digest != expected:
        raise CorpusError(
            f"{path} has sha256 {digest}, expected {expected}: it is not Tiny Shakespeare. "
            f"Delete it to download it again, or put a correct copy there"
        )


def _looks_binary(data: bytes) -> bool:
    return b"\x00" in data[:65536]


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(65536)
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc.strerror}; fix its permissions or remove it") from None


def _iter_file(path: Path, allow_empty: bool = False) -> Iterator[str]:
    """Decode a UTF-8 file chunk by chunk; errors name the file, the byte and the line."""
    if _looks_binary(_head(path)):
        raise CorpusError(f"{path} looks like a binary file (it holds NUL bytes): give a UTF-8 text file")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines, empty = 0, 1, True
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(CHUNK_BYTES)
                final = not data
                try:
                    text = decoder.decode(data, final=final)
                except UnicodeDecodeError as exc:
                    held = len(exc.object) - len(data)  # bytes the decoder kept from the last chunk
                    at = offset - held + exc.start
                    line = lines + exc.object[: exc.start].count(b"\n")
                    raise CorpusError(
                        f"{path} is not valid UTF-8 (byte {at}, line {line}): convert it, "
                        f"e.g. iconv -f latin1 -t utf-8 {path.name} > fixed.txt"
                    ) from None
                offset += len(data)
                lines += data.count(b"\n")
                if text:
                    empty = False
                    yield text
                if final:
                    break
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc.strerror}") from None
    if empty and not allow_empty:
        raise CorpusError(f"{path} is empty: give a corpus with some text in it")


def iter_hf_dataset(name: str, split: str = "train", column: str | None = None) -> Iterator[str]:
    """Rows of a Hugging Face dataset (a hub name or a local dataset folder), joined by newlines.

    The dataset is read in streaming mode, so one larger than memory never has to fit.
    """
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a declared dependency
        raise CorpusError("hf: corpora need the 'datasets' package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as exc:  # datasets raises many types; each means "could not load it"
        raise CorpusError(
            f"could not load Hugging Face dataset {name!r} (split {split!r}): {exc}. "
            "Check the name and split, or point hf: at a local dataset folder"
        ) from None
    if first is None:
        raise CorpusError(f"dataset {name!r} (split {split!r}) has no rows")
    string_columns = [c for c, v in first.items() if isinstance(v, str)]
    if column is None:
        column = "text" if "text" in string_columns else (string_columns[0] if len(string_columns) == 1 else None)
        if column is None:
            raise CorpusError(f"dataset {name!r} has string columns {string_columns}: choose one with --hf-column")
    elif column not in string_columns:
        raise CorpusError(f"dataset {name!r} has no text column {column!r}; its string columns are {string_columns}")
    empty = True
    for row in itertools.chain([first], rows):
        text = row.get(column)
        if text:
            yield text if empty else "\n" + text
            empty = False
    if empty:
        raise CorpusError(f"column {column!r} of dataset {name!r} is empty")


# --- splitting and batching -------------------------------------------------------


def split_tokens(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First 90% for training, last 10% for validation (the nanoGPT shakespeare_char split)."""
    n = int(len(tokens) * TRAIN_FRACTION)
    return tokens[:n], tokens[n:]


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
    ``rows`` selects a contiguous block of rows (one rank's share under DDP).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rows: slice | None = None):
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
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
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return int(torch.randint(self.seq_len, (1,), generator=g))

    def _row_length(self, epoch: int) -> int:
        return (len(self.tokens) - 1 - self._offset(epoch)) // self.batch_size

    def batches_in_epoch(self, epoch: int) -> int:
        return self._row_length(epoch) // self.seq_len

    def get(self, pos: StreamPosition) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the batch at ``pos``, each (rows, seq_len) int64."""
        off, length, t = self._offset(pos.epoch), self._row_length(pos.epoch), self.seq_len
        span = self.batch_size * length
        inputs = self.tokens[off : off + span].reshape(self.batch_size, length)
        targets = self.tokens[off + 1 : off + 1 + span].reshape(self.batch_size, length)
        cols = slice(pos.index * t, (pos.index + 1) * t)
        x = torch.from_numpy(inputs[self.rows, cols].astype(np.int64))
        y = torch.from_numpy(targets[self.rows, cols].astype(np.int64))
        return x, y

    def next(self, pos: StreamPosition) -> StreamPosition:
        """The position after ``pos``; past the last batch, the start of the next epoch."""
        if pos.index + 1 < self.batches_in_epoch(pos.epoch):
            return StreamPosition(pos.epoch, pos.index + 1)
        return StreamPosition(pos.epoch + 1, 0)

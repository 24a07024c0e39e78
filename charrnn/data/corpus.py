"""Corpora: find them, check them, read them in chunks.

A corpus spec is one of
- ``shakespeare``: Tiny Shakespeare, from the ``data/`` cache or downloaded and verified;
- a path to a UTF-8 text file, or to a folder (its text files, in sorted order);
- ``hf:OWNER/NAME`` (or ``hf:`` and a local dataset folder): a Hugging Face dataset.
"""

from __future__ import annotations

import codecs
import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from .._io import fsync_dir, open_regular, output_target, sha256_file
from ..errors import CorpusError, HubError
from ..hub import download_url

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


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
    # Anything there but a folder is read as a file, so a FIFO or a device gets its own sentence.
    return path if path.exists() and not path.is_dir() else None


def corpus_files(spec: str) -> list[Path]:
    """The local files a corpus spec stands for, in reading order (binary files of a folder left out)."""
    single = _single_file(spec)
    if single is not None:
        return [single]
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise CorpusError(f"corpus {spec!r} not found: give 'shakespeare', a path to a .txt file or folder, or hf:OWNER/NAME")
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
    """Fetch ``url`` to ``dest``, keeping it only if its sha256 matches.

    The bytes go to ``dest.part`` first, kept when a transfer is cut: the downloader retries
    at once, and the next run asks only for what the part lacks (the Hub client writes in
    pieces of 10 MB, so a file as small as Tiny Shakespeare is fetched again whole).
    ``dest`` appears only whole and checked.
    """
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(output_target(part), "ab") as out:  # output_target: never a FIFO or a device
            try:
                download_url(url, out)
            except HubError as exc:
                raise CorpusError(
                    f"could not download Tiny Shakespeare from {url} ({exc}); run again to resume it, or put the "
                    f"file at {dest} (any copy of input.txt with sha256 {sha256})"
                ) from None
            out.flush()
            os.fsync(out.fileno())
        digest = sha256_file(part)
        if digest != sha256:
            part.unlink()
            raise CorpusError(
                f"the file downloaded from {url} has sha256 {digest}, expected {sha256}; it was not kept. "
                f"Run again to download it afresh, or put a correct copy at {dest}"
            )
        os.replace(part, output_target(dest))
        fsync_dir(dest.parent)
    except OSError as exc:
        raise CorpusError(f"could not write {dest}: {exc.strerror or exc}; put the file there by hand") from None


def _verify_sha256(path: Path, expected: str) -> None:
    digest = sha256_file(path)
    if digest != expected:
        raise CorpusError(
            f"{path} has sha256 {digest}, expected {expected}: it is not Tiny Shakespeare. "
            f"Delete it to download it again, or put a correct copy there"
        )


def _looks_binary(data: bytes) -> bool:
    return b"\x00" in data[:65536]


def _head(path: Path) -> bytes:
    try:
        with open_regular(path) as f:
            return f.read(65536)
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc.strerror or exc}; give a readable text file") from None


def _iter_file(path: Path, allow_empty: bool = False) -> Iterator[str]:
    """Decode a UTF-8 file chunk by chunk; errors name the file, the byte and the line."""
    if _looks_binary(_head(path)):
        raise CorpusError(f"{path} looks like a binary file (it holds NUL bytes): give a UTF-8 text file")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines, empty = 0, 1, True
    try:
        with open_regular(path) as f:
            # Read what the file held when opened: one that grows as we read (a log) still ends.
            left = os.fstat(f.fileno()).st_size
            while True:
                data = f.read(min(CHUNK_BYTES, left))
                left -= len(data)
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
        raise CorpusError(f"cannot read {path}: {exc.strerror or exc}") from None
    if empty and not allow_empty:
        raise CorpusError(f"{path} is empty: give a corpus with some text in it")


VALIDATION_SPLITS = ("validation", "test")  # a dataset's own held-out splits, in the order taken


def hf_held_out_split(name: str, train_split: str) -> str | None:
    """The dataset's own ``validation`` split (or ``test``, where it has none) other than ``train_split``; None if neither."""
    try:
        import datasets

        names = datasets.get_dataset_split_names(name)
    except Exception:  # unreachable or unreadable here: loading it names the problem
        return None
    return next((s for s in VALIDATION_SPLITS if s in names and s != train_split), None)


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
    # Rows are joined into chunks of about CHUNK_BYTES: a dataset of short rows would otherwise
    # reach the counting and encoding passes a few hundred characters at a time, which costs
    # a fixed overhead per piece (the character count of a piece alone clears a 1.1 M-entry table).
    empty, pieces, size = True, [], 0
    for row in itertools.chain([first], rows):
        text = row.get(column)
        if text:
            pieces.append(text if empty else "\n" + text)
            size += len(text) + 1
            empty = False
            if size >= CHUNK_BYTES:
                yield "".join(pieces)
                pieces, size = [], 0
    if pieces:
        yield "".join(pieces)
    if empty:
        raise CorpusError(f"column {column!r} of dataset {name!r} is empty")

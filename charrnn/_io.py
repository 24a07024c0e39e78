"""Files: atomic writes, checksums, bounded reads of a user's text file.

Every file charrnn writes for later (checkpoint files, the token cache, a saved chat
session, the training plot, a downloaded corpus) goes through :func:`atomic_write`: it is
written beside its target under a hidden temporary name, flushed to disk, then renamed
over the target, so a reader (or a process started after a crash) sees the old file or
the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import CharRNNError

_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename is durable only once its folder is)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename still orders writes
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_path(path: Path) -> Path:
    """The hidden name a write to ``path`` goes to first (per process, so two writers never share one)."""
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it is fsynced and renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was; the
    exception propagates (callers turn an ``OSError`` into their own error sentence).
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_file(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` (in place, flushed to disk) and return its sha256.

    For files inside a folder that is itself renamed into place (a checkpoint), where a
    second rename per file would buy nothing.
    """
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return sha256_bytes(data)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read a MB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_text_file(path: str | Path, what: str, max_chars: int, error: type[CharRNNError], stdin: IO[str] | None = None) -> str:
    """A user's UTF-8 text file (or ``-`` for ``stdin``), at most ``max_chars`` characters.

    Reads one character more than the limit, so a caller can tell "at the limit" from
    "over it" without reading a huge file whole. Every failure is ``error`` with a
    sentence naming ``what`` (e.g. ``--text notes.txt``).
    """
    if str(path) == "-" and stdin is not None:
        return stdin.read(max_chars + 1)
    file = Path(path).expanduser()
    try:
        with open(file, encoding="utf-8") as f:  # universal newlines: \r\n reads as \n
            return f.read(max_chars + 1)
    except FileNotFoundError:
        raise error(f"cannot read {what}: no such file") from None
    except IsADirectoryError:
        raise error(f"cannot read {what}: it is a directory; give a text file") from None
    except UnicodeDecodeError:
        raise error(f"cannot read {what}: it is not UTF-8 text") from None
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror or exc}") from None


def user_cache_dir() -> Path:
    """charrnn's folder in the user's cache (``$XDG_CACHE_HOME/charrnn``, by default ``~/.cache/charrnn``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "charrnn"

"""Files: atomic writes, checksums, bounded reads, bounded JSON, the run-folder lock.

Every file charrnn writes for later (checkpoint files, the token cache, a saved chat
session, the training plot, the inspector's page, a downloaded corpus) goes through
:func:`atomic_write`: it is written beside its target under a hidden temporary name,
flushed to disk, then renamed over the target, so a reader (or a process started after a
crash) sees the old file or the new one, never half of one. It replaces only what is
absent or a regular file; a symlink to a regular file is written through (the link stays
and now points at the new file); a device, FIFO, socket or folder is never replaced.

Every file charrnn reads goes through :func:`open_regular`: opened without blocking (a
FIFO with no writer cannot hang us), refused unless it is a regular file (``/dev/zero``
behind a symlink is not), and read with a size bound enforced while reading (``st_size``
proves nothing for special files, and a regular file may grow as we read it).

Each failure here is an ``OSError`` whose ``strerror`` is the reason in words, so each
caller keeps its own sentence: "cannot read X: <reason>".
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from .errors import CharRNNError

_CHUNK = 1 << 20
MAX_JSON_BYTES = 16 << 20  # config, training state, tokenizer, token-cache metadata: all far smaller
MAX_JSON_DEPTH = 32  # charrnn's own files nest 4 deep at most
MAX_JSON_NUMBER_CHARS = 40  # a 64-bit integer has 20 digits; a float's repr fewer than 25


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _not_regular(mode: int, doing: str) -> OSError:
    return OSError(errno.EINVAL, f"it is {_kind(mode)}, not a regular file; {doing} only regular files")


def _too_large(limit: int) -> OSError:
    return OSError(errno.EFBIG, f"it is larger than {limit:,} bytes, the most charrnn reads from such a file")


def _open_checked(path: str | Path, flags: int, doing: str, mode: str, **text: Any) -> IO:
    """``os.open`` with ``O_NONBLOCK`` (a FIFO without a peer cannot make us wait), then refuse
    anything but a regular file, checked on the open descriptor (no race with a rename)."""
    fd = os.open(Path(path).expanduser(), flags | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        kind = os.fstat(fd).st_mode
        if not stat.S_ISREG(kind):
            raise _not_regular(kind, doing)
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode, **text)
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: str | Path) -> BinaryIO:
    """Open the regular file ``path`` to read bytes; ``OSError`` (its ``strerror`` in words) for anything else.

    A missing file is ``FileNotFoundError`` as usual.
    """
    return _open_checked(path, os.O_RDONLY | getattr(os, "O_BINARY", 0), "charrnn reads", "rb")


def open_append(path: str | Path) -> IO[str]:
    """Open the regular file ``path`` (created if absent) to append UTF-8 lines; ``OSError`` for anything else."""
    return _open_checked(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "charrnn appends to", "a", encoding="utf-8")


def read_bytes(path: str | Path, limit: int) -> bytes:
    """The bytes of the regular file ``path``, refused (``OSError``) past ``limit``.

    Read a MB at a time and at most ``limit + 1`` bytes in all, so a huge or growing file
    is never read whole (and no buffer of the limit's size is allocated up front).
    """
    parts, total = [], 0
    with open_regular(path) as f:
        while total <= limit and (part := f.read(min(_CHUNK, limit + 1 - total))):
            parts.append(part)
            total += len(part)
    if total > limit:
        raise _too_large(limit)
    return b"".join(parts)


# A string literal or a bracket. The closing quote is optional, so a match never fails and
# never backtracks: an unterminated string of escaped quotes is read once, not once per quote
# (a required quote made that quadratic: a 128 KB body held the server's event loop for 32 s).
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]')


def _json_depth(text: str) -> int:
    """How deep brackets nest in JSON ``text`` (those inside strings do not count), in one linear pass."""
    depth = deepest = 0
    for token in _JSON_TOKEN.findall(text):
        if token[0] == '"':
            continue
        depth += 1 if token in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _bounded_number(kind: type) -> Any:
    def parse(text: str) -> Any:
        if len(text) > MAX_JSON_NUMBER_CHARS:
            raise ValueError(f"a number of {len(text):,} digits")
        return kind(text)

    return parse


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON from outside, parsed with bounds on nesting and number length; ``ValueError`` if broken.

    Size is bounded by the caller's read. NaN and Infinity are refused: no charrnn file
    holds them, and they would pass later range checks as comparisons with NaN do.
    """
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    depth = _json_depth(text)
    if depth > max_depth:
        raise ValueError(f"nested {depth} levels deep; at most {max_depth} are read")
    return json.loads(text, parse_int=_bounded_number(int), parse_float=_bounded_number(float), parse_constant=_no_constant)


def read_json(path: str | Path, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file read with :func:`read_bytes` and parsed with :func:`parse_json`."""
    return parse_json(read_bytes(path, limit))


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


def output_target(path: str | Path) -> Path:
    """Where a write to ``path`` lands: ``path`` itself, or the file a symlink there points to.

    Raises ``OSError`` when that is a folder, a device, a FIFO or a socket: charrnn
    replaces only regular files, so ``/save /dev/full`` cannot replace a device node.
    """
    path = Path(path).expanduser()
    if path.is_symlink():
        path = Path(os.path.realpath(path))  # write through the link; a dangling one is created at its target
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(mode):
        raise _not_regular(mode, "charrnn replaces")
    return path


def temporary_path(path: Path) -> Path:
    """The hidden name a write to ``path`` goes to first (per process, so two writers never share one)."""
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it is fsynced and renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was; the
    exception propagates (callers turn an ``OSError`` into their own error sentence).
    What is replaced is decided by :func:`output_target`.
    """
    path = output_target(path)
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
    with open_regular(path) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_utf8(text: str, what: str, error: type[CharRNNError]) -> None:
    """Refuse text with lone surrogates: bytes that were not UTF-8, smuggled in by ``surrogateescape``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"cannot read {what}: it is not UTF-8 text") from None


def read_text_file(path: str | Path, what: str, max_chars: int, error: type[CharRNNError], stdin: IO[str] | None = None) -> str:
    """A user's UTF-8 text file (or ``-`` for ``stdin``), at most ``max_chars`` characters.

    Reads one character more than the limit, so a caller can tell "at the limit" from
    "over it" without reading a huge file whole. Every failure is ``error`` with a
    sentence naming ``what`` (e.g. ``--text notes.txt``); text that is not UTF-8 gets the
    same sentence from a file and from standard input.
    """
    try:
        if str(path) == "-" and stdin is not None:
            text = stdin.read(max_chars + 1)
            check_utf8(text, what, error)  # a terminal's stdin reads bad bytes as surrogates, not an error
            return text
        # newline=None: universal newlines, so \r\n reads as \n
        with io.TextIOWrapper(open_regular(path), encoding="utf-8", newline=None) as f:
            return f.read(max_chars + 1)
    except FileNotFoundError:
        raise error(f"cannot read {what}: no such file") from None
    except UnicodeDecodeError:
        raise error(f"cannot read {what}: it is not UTF-8 text") from None
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror or exc}") from None


def user_cache_dir() -> Path:
    """charrnn's folder in the user's cache, where the OS keeps it (``platformdirs``): on Linux
    ``$XDG_CACHE_HOME/charrnn`` (``~/.cache/charrnn``), on macOS ``~/Library/Caches/charrnn``,
    on Windows ``%LOCALAPPDATA%\\charrnn\\Cache``."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("charrnn", appauthor=False))


LOCK_FILE = ".charrnn.lock"  # where a folder cannot be locked itself (Windows), while charrnn writes to it


class FolderBusyError(OSError):
    """Another live process holds the folder's lock (``strerror`` names it)."""


def os_lock(path: Path) -> Any:
    """``filelock``'s OS lock on the file ``path`` (``flock`` on Linux and macOS, ``msvcrt.locking``
    on Windows), which the OS releases when its holder dies; None where the OS has neither:
    filelock's fallback there, a lock file's mere existence, would outlive a killed holder."""
    from filelock import FileLock, SoftFileLock  # torch's own dependency

    return None if FileLock is SoftFileLock else FileLock(path)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive OS lock on ``folder`` for the ``with`` block.

    The OS releases it when its holder exits or is killed, so a crashed run never leaves
    a stale lock. Where ``flock`` exists (Linux, macOS) it locks the folder itself and
    leaves no file behind, not even in a folder that turns out not to be ours; elsewhere
    (Windows) it is :func:`os_lock` on ``folder/.charrnn.lock``, which filelock deletes on
    release. Raises ``FolderBusyError`` when another process holds it, and ``OSError``
    for a folder this process cannot write to (read-only, no permission).
    """
    if not os.access(folder, os.W_OK):
        raise OSError(errno.EACCES, "it is read-only for this user (or on a read-only file system)")
    try:
        import fcntl
    except ImportError:  # not on Linux or macOS
        with _file_lock(folder / LOCK_FILE):
            yield
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusyError(errno.EBUSY, "another process holds its lock") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """:func:`os_lock` on ``path``, taken without waiting, for the ``with`` block."""
    from filelock import Timeout

    lock = os_lock(path)
    if lock is None:  # no OS lock at all: nothing is locked
        yield
        return
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FolderBusyError(errno.EBUSY, "another process holds its lock") from None
    try:
        yield
    finally:
        lock.release()

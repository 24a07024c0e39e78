"""A bounded cache of conversation states: turn 200 of a chat costs what turn 1 does.

The OpenAI protocol is stateless: every request sends the whole conversation again. An
RNN's memory of a text is one small hidden state (8 KB for a 2x512 LSTM), so the server
keeps the state after each request's prompt, keyed by a hash of the text read to get
there, and the next request of the same conversation, which extends that text, reads
only what is new.

The text is read in *pieces* (a prompt; or one piece per message, and the start of each
reply), and a key hashes the pieces, not just their concatenation: the cached state is
then exactly the state a miss computes by reading the same pieces one after another, so
a hit gives the same reply as a miss, bit for bit.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

from ..generation.sampler import Context


def piece_keys(pieces: Sequence[str]) -> list[str]:
    """The cache key after each piece: sha256 of the pieces so far, each framed by its length.

    The framing keeps ("ab", "c") and ("a", "bc") apart: they are read differently.
    One running digest, copied at each boundary, so a long conversation is hashed once.
    """
    digest = hashlib.sha256(b"charrnn-pieces-1")
    keys = []
    for piece in pieces:
        data = piece.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
        keys.append(digest.copy().hexdigest())
    return keys


def context_bytes(context: Context) -> int:
    """The memory a context holds (its tensors are compact: :meth:`StateCache.put` copies them)."""
    return context.nbytes()


class StateCache:
    """Contexts by key, least recently used out first, bounded by count and bytes; thread-safe.

    With ``max_entries=0`` nothing is kept (every lookup misses).
    """

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[str, tuple[Context, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Context | None:
        """The context stored under ``key`` (now the most recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def count(self, hit: bool) -> None:
        """Record one request's lookup as a hit or a miss (for /health)."""
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def put(self, key: str, context: Context) -> None:
        """Keep a copy of ``context`` under ``key``, dropping the least recently used beyond the bounds."""
        if self.max_entries == 0:
            return
        # A copy: the read's logits can be a view into the (1, T, V) output of the whole text.
        copied = context.clone()
        size = context_bytes(copied)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (copied, size)
            self.bytes += size
            while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped

    def stats(self) -> dict[str, int]:
        """Entries, bytes, their bounds, hits and misses (for /health)."""
        with self._lock:
            return {
                "entries": len(self._items),
                "bytes": self.bytes,
                "max_entries": self.max_entries,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
            }

"""The character vocabulary, stored as a Hugging Face ``tokenizers`` ``tokenizer.json``.

Every character is one token. Id 0 is always ``<unk>``: characters the vocabulary never
saw (in a prompt, say) map to it, and it decodes to U+FFFD (the Unicode replacement
character), so encoding never fails and decoding always gives one character per token.

The ``tokenizer.json`` is the source of truth and loads in any ``tokenizers`` program.
Encoding itself runs through a code-point lookup table built from that vocabulary: it
gives exactly the ids ``tokenizers`` gives (a test checks this) at a hundred times the
speed, which matters for corpora of gigabytes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from ._io import MAX_JSON_BYTES, check_utf8, parse_json, read_bytes
from .errors import PromptError

UNK_TOKEN = "<unk>"
UNK_ID = 0
REPLACEMENT_CHAR = "\ufffd"
_MAX_CODE_POINT = 0x110000


def is_surrogate(ch: str) -> bool:
    """A lone UTF-16 surrogate: possible in a Python str, never a character of UTF-8 text."""
    return len(ch) == 1 and 0xD800 <= ord(ch) <= 0xDFFF


class CharTokenizer:
    """Maps characters to ids and back; id 0 is the unknown character."""

    def __init__(self, chars: Iterable[str]):
        self.chars: list[str] = [UNK_TOKEN]
        seen = set()
        for ch in chars:
            if len(ch) != 1:
                raise ValueError(f"vocabulary entries must be single characters, got {ch!r}")
            if is_surrogate(ch):
                raise ValueError(f"a lone surrogate ({ch!r}) cannot be a vocabulary entry: it is not a character")
            if ch not in seen:
                seen.add(ch)
                self.chars.append(ch)
        # Decoding table: id -> character, with <unk> shown as the replacement character.
        self._decode_table = [REPLACEMENT_CHAR] + self.chars[1:]
        # Encoding table: code point -> id (0 for anything unseen). uint32 keeps it compact.
        self._encode_table = np.zeros(_MAX_CODE_POINT, dtype=np.int32)
        for i, ch in enumerate(self.chars[1:], start=1):
            self._encode_table[ord(ch)] = i
        self.token_dtype = np.uint8 if len(self.chars) <= 256 else (np.uint16 if len(self.chars) <= 65536 else np.uint32)

    @classmethod
    def from_text(cls, text: str, max_vocab: int = 0) -> "CharTokenizer":
        """Build the vocabulary of ``text``: every character, in code-point order.

        With ``max_vocab`` > 0, keep only the most frequent ``max_vocab - 1`` characters;
        the rest map to ``<unk>`` (so one stray emoji does not grow the model).
        """
        counts = Counter(text)
        return cls.from_counts(counts, max_vocab)

    @classmethod
    def from_counts(cls, counts: Counter, max_vocab: int = 0) -> "CharTokenizer":
        # Lone surrogates (possible in a Python str, never in UTF-8 text) cannot be stored
        # in tokenizer.json: they stay out of the vocabulary and read as <unk>.
        counts = Counter({c: n for c, n in counts.items() if not is_surrogate(c)})
        chars = list(counts)
        if max_vocab and len(chars) > max_vocab - 1:
            chars = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: max_vocab - 1]]
        return cls(sorted(chars))

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: str) -> bool:
        return len(ch) == 1 and self._encode_table[ord(ch)] != UNK_ID

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` as a compact array (unknown characters give id 0)."""
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        return self._encode_table[codes].astype(self.token_dtype)

    def decode(self, ids: Iterable[int]) -> str:
        table = self._decode_table
        return "".join(table[i] for i in ids)

    def unknown_chars(self, text: str) -> list[str]:
        """The distinct characters of ``text`` that the vocabulary does not hold."""
        return sorted({ch for ch in text if ch not in self})

    def check_known(self, text: str, what: str = "the prompt") -> list[str]:
        """The characters of ``text`` the model never saw; a ``PromptError`` if there are no others.

        ``what`` names the text in the error ("the prompt", "the message", "the text").
        Text holding lone surrogates (undecodable bytes, as Python reads non-UTF-8 input
        from argv or a terminal) is refused with the sentence a non-UTF-8 file gets.
        """
        check_utf8(text, what, PromptError)
        unknown = self.unknown_chars(text)
        if unknown and len(unknown) == len(set(text)):
            raise PromptError(
                f"{what} is made only of characters the model never saw ({''.join(unknown[:20])!r}): "
                "write it with characters of the training corpus"
            )
        return unknown

    @staticmethod
    def unknown_note(unknown: list[str]) -> str:
        """The warning for characters read as ``<unk>`` (from :meth:`check_known`)."""
        return f"the model never saw {''.join(unknown[:20])!r}; those characters are read as <unk>"

    # --- the tokenizer.json file -------------------------------------------------
    def to_hf(self) -> Tokenizer:
        """The same vocabulary as a ``tokenizers.Tokenizer`` (one token per character)."""
        vocab = {ch: i for i, ch in enumerate(self.chars)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
        # "(?m)." is Oniguruma's "any character, newline included": one token per character.
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
        tok.decoder = decoders.Fuse()
        return tok

    def save(self, path: str | Path) -> None:
        self.to_hf().save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        """Load a ``tokenizer.json`` written by :meth:`save`.

        Raises ValueError if the file is not a character-level WordLevel tokenizer.
        """
        return cls.load_bytes(read_bytes(path, MAX_JSON_BYTES))

    @classmethod
    def load_bytes(cls, raw: bytes) -> "CharTokenizer":
        """Parse the bytes of a ``tokenizer.json`` (ValueError if it is not one of ours)."""
        data = parse_json(raw)
        model = data.get("model") if isinstance(data, dict) else None
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if not isinstance(vocab, dict) or model.get("type") != "WordLevel":
            raise ValueError("not a charrnn character tokenizer (expected a WordLevel model with a vocab)")
        if not all(type(i) is int for i in vocab.values()):
            raise ValueError("vocabulary ids must be integers")
        by_id = sorted(vocab.items(), key=lambda kv: kv[1])
        if [i for _, i in by_id] != list(range(len(by_id))) or not by_id or by_id[0][0] != UNK_TOKEN:
            raise ValueError("vocabulary ids must run 0..n-1 with <unk> at 0")
        chars = [ch for ch, _ in by_id[1:]]
        if any(len(ch) != 1 for ch in chars):
            raise ValueError("every vocabulary entry after <unk> must be a single character")
        return cls(chars)

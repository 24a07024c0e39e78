"""The character vocabulary: exact round trips, agreement with `tokenizers`, unknowns, dtypes."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from charrnn.tokenizer import REPLACEMENT_CHAR, UNK_ID, UNK_TOKEN, CharTokenizer

MIXED = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "\tindented\tline  with  double spaces \n"
    "windows line\r\nend; trailing space \n"
    "café naïve Ærø — “quotes” … 日本語 😀🎉 ünïcödé\n"
    "vertical\x0btab form\x0cfeed nel\x85 ls\u2028 ps\u2029 end"
)


@pytest.mark.parametrize(
    "text",
    [MIXED, "a", "\n", "\n\n\n", " \t \t ", "😀", "x\r\ny\rz\n"],
    ids=["mixed", "single", "newline", "newlines", "whitespace", "astral", "carriage-returns"],
)
def test_round_trip_is_exact(text):
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one token per character, astral ones included
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


@pytest.mark.parametrize(
    "text",
    [MIXED, MIXED + "unseen: ЖЖЖ 🚀 ~#$", "\n \t\r\n", "😀😀a😀"],
    ids=["mixed", "with-unknowns", "whitespace", "astral"],
)
def test_fast_encode_equals_tokenizers_library(text):
    tok = CharTokenizer.from_text(MIXED)
    assert tok.encode(text).tolist() == tok.to_hf().encode(text).ids


def test_vocabulary_is_unk_then_characters_in_code_point_order():
    tok = CharTokenizer.from_text("cab\nba")
    assert tok.chars == [UNK_TOKEN, "\n", "a", "b", "c"]
    assert tok.vocab_size == len(tok) == 5
    assert tok.encode("abc\n").tolist() == [2, 3, 4, 1]


def test_save_and_load_round_trip(tmp_path):
    tok = CharTokenizer.from_text(MIXED)
    path = tmp_path / "tokenizer.json"
    tok.save(path)

    loaded = CharTokenizer.load(path)
    assert loaded.chars == tok.chars
    assert loaded.encode(MIXED).tolist() == tok.encode(MIXED).tolist()
    assert loaded.decode(loaded.encode(MIXED)) == MIXED
    # The file is a real tokenizers file: any tokenizers program gets the same ids.
    assert Tokenizer.from_file(str(path)).encode(MIXED).ids == tok.encode(MIXED).tolist()


def test_load_rejects_a_tokenizer_json_that_is_not_ours(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "BPE", "vocab": {"a": 0}}}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a charrnn character tokenizer"):
        CharTokenizer.load(path)


def test_unknown_characters_map_to_id_0_and_decode_to_replacement_char():
    tok = CharTokenizer.from_text("abc")
    text = "a€b😀c\ud800Ж"  # euro, astral emoji, a lone surrogate, Cyrillic: none seen
    ids = tok.encode(text)  # must not raise
    assert ids.tolist() == [1, UNK_ID, 2, UNK_ID, 3, UNK_ID, UNK_ID]
    assert tok.decode(ids) == "a" + REPLACEMENT_CHAR + "b" + REPLACEMENT_CHAR + "c" + REPLACEMENT_CHAR * 2
    assert tok.unknown_chars(text) == sorted({"€", "😀", "\ud800", "Ж"})
    assert "€" not in tok and "a" in tok


def test_token_dtype_is_uint8_for_small_vocabularies():
    tok = CharTokenizer.from_text(MIXED)
    assert tok.encode(MIXED).dtype == np.uint8


@pytest.mark.parametrize(
    ("distinct_chars", "dtype"),
    [(255, np.uint8), (256, np.uint16), (300, np.uint16)],
)
def test_token_dtype_widens_past_256_tokens(distinct_chars, dtype):
    text = "".join(chr(0x4E00 + i) for i in range(distinct_chars))
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == distinct_chars + 1  # plus <unk>
    ids = tok.encode(text)
    assert ids.dtype == dtype
    assert ids.tolist() == list(range(1, distinct_chars + 1))  # no id wrapped around
    assert tok.decode(ids) == text

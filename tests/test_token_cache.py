"""Large corpora: streaming vocabulary, the token cache beside the corpus, --max-vocab."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import tiny_model_config, tiny_train_config

from charrnn.data import corpus as data
from charrnn.data.token_cache import cache_folder, corpus_tokens, count_characters
from charrnn.errors import ConfigError, CorpusError
from charrnn.tokenizer import CharTokenizer
from charrnn.training.trainer import Trainer


@pytest.fixture
def small_chunks(monkeypatch):
    """Read corpora 7 bytes at a time, so every test crosses many chunk boundaries."""
    monkeypatch.setattr(data, "CHUNK_BYTES", 7)


def test_tokens_equal_encoding_the_whole_text_and_are_memory_mapped(tmp_path, small_chunks):
    text = "naïve café — 日本語\nline two 😀 ends\n" * 20  # multi-byte characters split across chunks
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8")
    tokens, tokenizer = corpus_tokens(str(path))
    reference = CharTokenizer.from_text(text)
    assert tokenizer.chars == reference.chars
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint8
    np.testing.assert_array_equal(tokens, reference.encode(text))
    assert tokenizer.decode(tokens) == text
    assert (cache_folder(str(path)) / "tokens.bin").exists()
    assert cache_folder(str(path)).parent == tmp_path  # beside the corpus, hidden
    assert cache_folder(str(path)).name == ".c.txt.charrnn"


def test_the_cache_is_reused_until_the_corpus_changes(tmp_path, monkeypatch):
    path = tmp_path / "c.txt"
    path.write_text("abcabc\n" * 10, encoding="utf-8")
    corpus_tokens(str(path))
    calls = []
    real_read = data.read_files
    monkeypatch.setattr("charrnn.data.token_cache.read_files", lambda *a, **k: calls.append(a) or real_read(*a, **k))
    tokens, _ = corpus_tokens(str(path))
    assert calls == []  # a cache hit reads nothing of the corpus
    path.write_text("xyzxyz\n" * 12, encoding="utf-8")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    tokens, tokenizer = corpus_tokens(str(path))
    assert calls  # the changed corpus was read again
    assert tokenizer.decode(tokens) == "xyzxyz\n" * 12


def test_a_read_only_folder_gets_its_cache_under_the_data_dir(tmp_path, data_dir):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "c.txt"
    path.write_text("hello world\n", encoding="utf-8")
    folder.chmod(0o555)
    try:
        tokens, tokenizer = corpus_tokens(str(path))
        assert tokenizer.decode(tokens) == "hello world\n"
        assert sorted(p.name for p in folder.iterdir()) == ["c.txt"]
        assert cache_folder(str(path)).parent == data_dir / "cache"
    finally:
        folder.chmod(0o755)


def test_a_resumed_runs_vocabulary_makes_its_own_token_file(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("abc\n" * 10, encoding="utf-8")
    own, _ = corpus_tokens(str(path))
    given = CharTokenizer("cba\n")  # another order: other ids
    tokens, tokenizer = corpus_tokens(str(path), tokenizer=given)
    assert tokenizer.chars == given.chars
    np.testing.assert_array_equal(tokens, given.encode("abc\n" * 10))
    assert not np.array_equal(tokens, own)


def test_max_vocab_keeps_the_most_frequent_characters(tmp_path):
    text = "a" * 50 + "b" * 30 + "c" * 20 + "😀" + "\n"
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8")
    tokens, tokenizer = corpus_tokens(str(path), max_vocab=4)  # <unk> + the 3 most frequent
    assert tokenizer.vocab_size == 4 and set(tokenizer.chars[1:]) == {"a", "b", "c"}
    assert int((tokens == 0).sum()) == 2  # the emoji and the newline read as <unk>
    assert count_characters(data.iter_corpus(str(path)))["😀"] == 1


def test_max_vocab_reaches_the_model_through_training(tmp_path, corpus_file):
    trainer = Trainer(tiny_train_config(corpus_file, tmp_path / "run", max_vocab=10), tiny_model_config())
    assert trainer.tokenizer.vocab_size == 10
    assert trainer.model.head.out_features == 10
    with pytest.raises(ConfigError, match="max_vocab must be 0 .all. or at least 2"):
        tiny_train_config(corpus_file, tmp_path / "run", max_vocab=1)


def test_an_interrupted_encoding_leaves_no_cache_that_looks_whole(tmp_path, monkeypatch):
    path = tmp_path / "c.txt"
    path.write_text("abc\n" * 100, encoding="utf-8")

    def failing_encode(self, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CharTokenizer, "encode", failing_encode)
    with pytest.raises(CorpusError, match="could not write the token cache"):
        corpus_tokens(str(path))
    folder = cache_folder(str(path))
    assert not (folder / "meta.json").exists()
    assert [p.name for p in folder.iterdir() if "tmp" in p.name] == []
    monkeypatch.undo()
    tokens, tokenizer = corpus_tokens(str(path))
    assert tokenizer.decode(tokens) == "abc\n" * 100


def test_a_damaged_cache_is_rebuilt(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("abc\n" * 10, encoding="utf-8")
    corpus_tokens(str(path))
    meta = cache_folder(str(path)) / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "n_tokens": 10**9}))
    tokens, tokenizer = corpus_tokens(str(path))
    assert tokenizer.decode(tokens) == "abc\n" * 10


def test_invalid_utf8_far_into_a_chunked_file_names_its_byte_and_line(tmp_path, small_chunks):
    path = tmp_path / "c.txt"
    path.write_bytes(b"line one\nline two\ncaf\xe9\n")
    with pytest.raises(CorpusError, match=r"is not valid UTF-8 \(byte 21, line 3\)"):
        corpus_tokens(str(path))


def test_a_folder_is_scanned_once_per_run(tmp_path, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("some text\n", encoding="utf-8")
    (folder / "logo.png").write_bytes(b"\x89PNG\x00\x00")
    tokens, tokenizer = corpus_tokens(str(folder))
    assert tokenizer.decode(tokens) == "some text\n"
    assert capsys.readouterr().err.count("skipping binary file") == 1

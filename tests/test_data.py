"""Corpora (files, folders, hf:, Tiny Shakespeare), the 90/10 split, and batch streams."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from conftest import make_text, tiny_model_config, tiny_train_config

from charrnn.data.corpus import SHAKESPEARE_SHA256, iter_corpus, load_corpus, shakespeare_path
from charrnn.data.splits import split_tokens
from charrnn.data.streams import BatchStreams, StreamPosition
from charrnn.errors import CorpusError
from charrnn.tokenizer import CharTokenizer
from charrnn.training.trainer import Trainer

# --- the 90/10 split ------------------------------------------------------------------


@pytest.mark.parametrize(("n", "n_train"), [(1000, 900), (1001, 900), (1009, 908), (20, 18), (11, 9)])
def test_split_is_first_90_percent_train_last_10_percent_val(n, n_train):
    tokens = np.arange(n)
    train, val = split_tokens(tokens)
    assert len(train) == n_train
    assert len(val) == n - n_train
    np.testing.assert_array_equal(train, tokens[:n_train])
    np.testing.assert_array_equal(val, tokens[n_train:])


def test_trainer_splits_the_corpus_90_10(tmp_path, corpus_file, corpus_text):
    trainer = Trainer(tiny_train_config(corpus_file, tmp_path / "run"), tiny_model_config())
    n = len(corpus_text)
    cut = int(n * 0.9)
    assert len(trainer.train_tokens) == cut and len(trainer.val_tokens) == n - cut
    assert trainer.tokenizer.decode(trainer.train_tokens) == corpus_text[:cut]
    assert trainer.tokenizer.decode(trainer.val_tokens) == corpus_text[cut:]


# --- reading corpora --------------------------------------------------------------------


def test_text_file_is_read_exactly(tmp_path):
    text = "line one\n\tline two  \nnaïve 日本 😀\n"
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8")
    assert load_corpus(str(path)) == text


def test_invalid_utf8_is_a_corpus_error_naming_the_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=re.escape(str(path)) + r" is not valid UTF-8 \(byte 3, line 1\)"):
        load_corpus(str(path))


def test_empty_file_is_a_corpus_error_naming_the_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(CorpusError, match=re.escape(str(path)) + " is empty"):
        load_corpus(str(path))


def test_binary_file_is_a_corpus_error_naming_the_file(tmp_path):
    path = tmp_path / "image.bin"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(CorpusError, match=re.escape(str(path)) + " looks like a binary file"):
        load_corpus(str(path))


def test_missing_path_is_a_corpus_error_naming_it(tmp_path):
    missing = tmp_path / "no" / "such" / "file.txt"
    with pytest.raises(CorpusError, match=re.escape(repr(str(missing))) + " not found"):
        load_corpus(str(missing))


def test_corpus_too_short_for_one_batch_is_a_corpus_error():
    tokens = np.zeros(79, dtype=np.uint8)  # batch 4 x seq 16 needs 4 * 16 + 16 = 80
    with pytest.raises(CorpusError, match=r"has 79 characters, but batch size 4 x sequence length 16 needs at least 80"):
        BatchStreams(tokens, batch_size=4, seq_len=16, seed=0)
    BatchStreams(np.zeros(80, dtype=np.uint8), batch_size=4, seq_len=16, seed=0)  # exactly enough is fine


def test_training_on_a_corpus_too_short_for_one_batch_names_the_file(tmp_path):
    path = tmp_path / "short_corpus.txt"
    path.write_text("to be or not to be, that is the question, whether tis nobler", encoding="utf-8")
    config = tiny_train_config(path, tmp_path / "run", batch_size=4, seq_len=16)
    with pytest.raises(CorpusError, match=re.escape(str(path))):
        Trainer(config, tiny_model_config())


def test_folder_reads_files_in_sorted_order_and_skips_hidden_ones(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / ".git").mkdir()
    (folder / "b.txt").write_text("second", encoding="utf-8")  # no final newline: one is added
    (folder / "a.txt").write_text("first\n", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("third\n", encoding="utf-8")
    (folder / ".hidden.txt").write_text("SECRET FILE\n", encoding="utf-8")
    (folder / ".git" / "config").write_text("SECRET GIT\n", encoding="utf-8")
    assert load_corpus(str(folder)) == "first\nsecond\nthird\n"


def test_folder_with_a_non_utf8_file_names_that_file(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("fine\n", encoding="utf-8")
    bad = folder / "b.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(CorpusError, match=re.escape(str(bad)) + " is not valid UTF-8"):
        load_corpus(str(folder))


def test_folder_without_text_is_a_corpus_error_naming_it(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / ".hidden.txt").write_text("hidden\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=re.escape(str(folder)) + " holds no non-empty text files"):
        load_corpus(str(folder))


# --- hf: datasets, from a local folder only (the hub is unreachable) --------------------


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """Point datasets' caches at tmp dirs and forbid the hub, even if datasets is already imported."""
    for name in ("HF_HOME", "HF_DATASETS_CACHE"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    return tmp_path


def _write_jsonl(folder, rows):
    import json

    folder.mkdir(parents=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_hf_local_dataset_folder_gives_its_text_column(hf_offline, tmp_path):
    ds = tmp_path / "ds"
    _write_jsonl(ds, [{"text": "First row.", "n": 1}, {"text": "Second row: naïve 😀", "n": 2}])
    assert load_corpus(f"hf:{ds}") == "First row.\nSecond row: naïve 😀"


def test_hf_bad_column_name_is_a_corpus_error(hf_offline, tmp_path):
    ds = tmp_path / "ds"
    _write_jsonl(ds, [{"text": "First row.", "title": "a"}])
    with pytest.raises(CorpusError, match=r"has no text column 'body'; its string columns are \['text', 'title'\]"):
        load_corpus(f"hf:{ds}", hf_column="body")


def test_hf_picks_a_named_column(hf_offline, tmp_path):
    ds = tmp_path / "ds"
    _write_jsonl(ds, [{"body": "one", "title": "A"}, {"body": "two", "title": "B"}])
    assert load_corpus(f"hf:{ds}", hf_column="body") == "one\ntwo"
    with pytest.raises(CorpusError, match=r"choose one with --hf-column"):
        load_corpus(f"hf:{ds}")


def test_hf_parquet_shards_stream_in_bounded_chunks_into_a_memory_mapped_token_file(hf_offline, tmp_path, monkeypatch):
    """A folder of parquet shards (what a hub dataset is) goes through the same streaming path as a
    text file: chunks of about CHUNK_BYTES (never the whole dataset), then one mapped token file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import charrnn.data.corpus
    from charrnn.data.token_cache import corpus_tokens

    ds, rows = tmp_path / "shards", [make_text(seed=i, n_chars=300 + 7 * i) for i in range(60)]
    ds.mkdir()
    for shard in range(3):  # row groups of 5 rows: a reader holds a few rows at a time
        pq.write_table(
            pa.table({"text": rows[shard * 20 : (shard + 1) * 20]}), ds / f"train-{shard:05d}.parquet", row_group_size=5
        )
    monkeypatch.setattr(charrnn.data.corpus, "CHUNK_BYTES", 2000)
    chunks = list(iter_corpus(f"hf:{ds}"))
    assert "".join(chunks) == "\n".join(rows)
    assert 5 < len(chunks) < len(rows) and max(map(len, chunks)) < 2000 + max(map(len, rows)) + 1
    tokens, tokenizer = corpus_tokens(f"hf:{ds}")
    assert isinstance(tokens, np.memmap) and tokenizer.decode(tokens.tolist()) == "\n".join(rows)


def test_hf_missing_dataset_is_a_corpus_error(hf_offline, tmp_path):
    with pytest.raises(CorpusError, match="could not load Hugging Face dataset"):
        load_corpus(f"hf:{tmp_path / 'no_such_dataset'}")


# --- Tiny Shakespeare: cache, download, verification --------------------------------------


def test_shakespeare_is_read_from_the_cache(shakespeare_data_dir, shakespeare_source):
    text = load_corpus("shakespeare")
    assert text == shakespeare_source.read_text(encoding="utf-8")
    assert len(text) == 1_115_394
    assert text.startswith("First Citizen:\n")


class FileServer:
    """``data`` over HTTP on 127.0.0.1, with Range requests, as a download host serves a file.

    ``cut_after``: the next answers stop after that many bytes and drop the connection
    (``cuts`` of them); ``down``: connections are refused. ``ranges`` records each request's Range.
    """

    def __init__(self, data: bytes):
        self.data, self.cut_after, self.cuts, self.ranges = data, None, 0, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                start = 0
                if header := self.headers.get("Range"):
                    start = int(header.removeprefix("bytes=").split("-")[0])
                server.ranges.append(header)
                body = server.data[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.data) - 1}/{len(server.data)}")
                self.end_headers()
                if server.cuts and server.cut_after is not None:
                    server.cuts -= 1
                    self.wfile.write(body[: server.cut_after])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # a transfer cut halfway
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/input.txt"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def online(monkeypatch):
    """The download goes through the Hub client, which fetches nothing while HF_HUB_OFFLINE is set."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def shakespeare_host(shakespeare_source, monkeypatch):
    host = FileServer(shakespeare_source.read_bytes())
    monkeypatch.setenv("CHARRNN_SHAKESPEARE_URL", host.url)
    online(monkeypatch)
    yield host
    host.close()


def test_shakespeare_download_verifies_and_caches(data_dir, shakespeare_host, monkeypatch):
    path = shakespeare_path()
    assert path == data_dir / "shakespeare" / "input.txt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHAKESPEARE_SHA256
    assert sorted(p.name for p in path.parent.iterdir()) == ["input.txt"]  # no partial download left
    # Cached: the URL is no longer needed.
    monkeypatch.setenv("CHARRNN_SHAKESPEARE_URL", "http://127.0.0.1:9/nowhere.txt")
    assert len(load_corpus("shakespeare")) == 1_115_394


def test_a_download_cut_halfway_is_retried_and_completes(data_dir, shakespeare_host):
    shakespeare_host.cut_after, shakespeare_host.cuts = 400_000, 2
    path = shakespeare_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHAKESPEARE_SHA256
    assert len(shakespeare_host.ranges) == 3  # two cut transfers, then a whole one
    assert sorted(p.name for p in path.parent.iterdir()) == ["input.txt"]


def test_a_download_that_keeps_failing_is_a_sentence_and_the_next_run_completes(data_dir, shakespeare_host):
    shakespeare_host.cut_after, shakespeare_host.cuts = 300_000, 100  # every try is cut
    dest = data_dir / "shakespeare" / "input.txt"
    with pytest.raises(CorpusError, match="could not download Tiny Shakespeare.*run again to resume it"):
        load_corpus("shakespeare")
    assert not dest.exists()  # nothing half-written under the name a run reads
    kept = data_dir / "shakespeare" / "input.txt.part"
    kept = kept.stat().st_size if kept.exists() else 0
    shakespeare_host.cuts, shakespeare_host.ranges = 0, []
    assert len(load_corpus("shakespeare")) == 1_115_394
    assert shakespeare_host.ranges == [f"bytes={kept}-" if kept else None]  # only what the .part lacks
    assert sorted(p.name for p in dest.parent.iterdir()) == ["input.txt"]


def test_shakespeare_download_of_a_wrong_file_is_rejected_and_not_kept(data_dir, monkeypatch):
    host = FileServer(b"This is not Tiny Shakespeare.\n" * 100)
    monkeypatch.setenv("CHARRNN_SHAKESPEARE_URL", host.url)
    online(monkeypatch)
    try:
        with pytest.raises(CorpusError, match=r"sha256 [0-9a-f]{64}, expected " + SHAKESPEARE_SHA256):
            load_corpus("shakespeare")
    finally:
        host.close()
    folder = data_dir / "shakespeare"
    assert not (folder / "input.txt").exists()
    assert list(folder.iterdir()) == []  # no partial file either


def test_shakespeare_unreachable_url_says_where_to_put_the_file(data_dir, monkeypatch, capfd):
    monkeypatch.setenv("CHARRNN_SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")  # nothing listens on port 9
    online(monkeypatch)
    dest = data_dir / "shakespeare" / "input.txt"
    with pytest.raises(CorpusError, match="could not download Tiny Shakespeare.*put the file at " + re.escape(str(dest))):
        load_corpus("shakespeare")
    assert not dest.exists()
    assert "Trying to resume" not in capfd.readouterr().err  # the downloader's retries say nothing: the error is the sentence


def test_corrupt_cached_shakespeare_is_a_corpus_error(data_dir):
    dest = data_dir / "shakespeare" / "input.txt"
    dest.parent.mkdir()
    dest.write_text("First Citizen:\nnot the real thing\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=re.escape(str(dest)) + " has sha256 .* it is not Tiny Shakespeare"):
        load_corpus("shakespeare")


# --- batch streams -----------------------------------------------------------------------


def _positions(streams, start, count):
    pos = start
    for _ in range(count):
        yield pos
        pos = streams.next(pos)


@pytest.mark.parametrize(("batch_size", "seq_len", "n"), [(3, 2, 25), (4, 5, 203), (2, 7, 100)])
def test_consecutive_batches_continue_each_row_exactly(batch_size, seq_len, n):
    # Token value == its index in the corpus, so every tensor says where it was read from.
    tokens = np.arange(n, dtype=np.int64)
    streams = BatchStreams(tokens, batch_size, seq_len, seed=7)
    for epoch in range(3):  # epoch 0 starts at offset 0, later epochs at a seeded offset
        batches = [streams.get(StreamPosition(epoch, i)) for i in range(streams.batches_in_epoch(epoch))]
        assert len(batches) >= 1
        for x, y in batches:
            assert x.shape == y.shape == (batch_size, seq_len)
            assert x.dtype == y.dtype == torch.int64
            # each row is contiguous corpus text, and the targets are the inputs shifted by one
            assert torch.equal(x[:, 1:], x[:, :-1] + 1)
            assert torch.equal(y, x + 1)
        for (x0, y0), (x1, _) in zip(batches, batches[1:]):
            assert torch.equal(x1[:, 0], x0[:, -1] + 1)  # row b continues where it stopped
            assert torch.equal(x1[:, 0], y0[:, -1])
        # rows are disjoint slices, in order
        first = batches[0][0][:, 0]
        assert torch.all(first[1:] > first[:-1])
        assert int(batches[-1][1].max()) <= n - 1


def test_example_layout_from_the_docstring():
    tokens = np.arange(24)  # a..x
    streams = BatchStreams(tokens, batch_size=3, seq_len=2, seed=0)
    x, y = streams.get(StreamPosition(0, 0))
    assert x.tolist() == [[0, 1], [7, 8], [14, 15]]
    assert y.tolist() == [[1, 2], [8, 9], [15, 16]]
    x, _ = streams.get(StreamPosition(0, 1))
    assert x.tolist() == [[2, 3], [9, 10], [16, 17]]


def test_epoch_rollover_goes_to_next_epoch_index_0():
    streams = BatchStreams(np.arange(203), batch_size=4, seq_len=5, seed=3)
    per_epoch = streams.batches_in_epoch(0)
    assert per_epoch == (203 - 1) // 4 // 5
    positions = list(_positions(streams, StreamPosition(), per_epoch + 2))
    assert positions[:per_epoch] == [StreamPosition(0, i) for i in range(per_epoch)]
    assert positions[per_epoch] == StreamPosition(1, 0)
    assert positions[per_epoch + 1] == StreamPosition(1, 1)
    last_of_epoch_1 = StreamPosition(1, streams.batches_in_epoch(1) - 1)
    assert streams.next(last_of_epoch_1) == StreamPosition(2, 0)


def test_streams_are_deterministic_given_the_seed():
    tokens = np.arange(500)
    a = BatchStreams(tokens, 4, 8, seed=11)
    b = BatchStreams(tokens, 4, 8, seed=11)
    for epoch in range(4):
        xa, _ = a.get(StreamPosition(epoch, 0))
        xb, _ = b.get(StreamPosition(epoch, 0))
        assert torch.equal(xa, xb)


def test_uint8_tokens_of_a_real_corpus_stream_correctly(corpus_text):
    tok = CharTokenizer.from_text(corpus_text)
    tokens = tok.encode(corpus_text)
    assert tokens.dtype == np.uint8
    streams = BatchStreams(tokens, batch_size=4, seq_len=10, seed=0)
    x, y = streams.get(StreamPosition(0, 0))
    row_length = (len(tokens) - 1) // 4
    for b in range(4):
        start = b * row_length
        assert tok.decode(x[b].tolist()) == corpus_text[start : start + 10]
        assert tok.decode(y[b].tolist()) == corpus_text[start + 1 : start + 11]

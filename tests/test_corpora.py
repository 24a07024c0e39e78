"""Corpora as people have them: every file of a folder validates, --val-data, a dataset's own splits."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN_FLAGS, TRAIN_SCRIPT, CrashAt, make_text, run_python, tiny_model_config, tiny_train_config
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from charrnn.cli import score
from charrnn.data.parts import TokenParts
from charrnn.data.splits import read_run_data
from charrnn.data.streams import BatchStreams, StreamPosition
from charrnn.share.publish import model_card
from charrnn.training.callbacks import MetricsLog
from charrnn.training.trainer import Trainer, train


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=6),
    st.lists(st.integers(0, 400), min_size=1, max_size=50),
)
def test_token_parts_read_as_the_joined_array(sizes, picks):
    parts = [np.arange(sum(sizes[:i]), sum(sizes[: i + 1]), dtype=np.uint16) for i in range(len(sizes))]
    joined, whole = TokenParts(parts), np.concatenate(parts)
    assert len(joined) == len(whole)
    if len(whole):
        index = np.array(picks) % len(whole)
        np.testing.assert_array_equal(joined[index], whole[index])
        np.testing.assert_array_equal(joined[index.reshape(-1, 1)], whole[index.reshape(-1, 1)])
        np.testing.assert_array_equal(joined[picks[0] % len(whole) :], whole[picks[0] % len(whole) :])
        a, b = sorted(p % (len(whole) + 1) for p in (picks + picks)[:2])
        np.testing.assert_array_equal(joined[a:b], whole[a:b])  # a stretch across segments, read by slices


def test_batches_over_parts_equal_batches_over_the_joined_tokens():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 50, n).astype(np.uint8) for n in (300, 1, 457, 90)]
    over_parts = BatchStreams(TokenParts(parts), 6, 8, seed=3, rows=slice(2, 5))
    over_array = BatchStreams(np.concatenate(parts), 6, 8, seed=3, rows=slice(2, 5))
    pos = StreamPosition()
    for _ in range(40):  # across an epoch boundary, where the offset moves
        for a, b in zip(over_parts.get(pos), over_array.get(pos)):
            assert a.equal(b)
        pos = over_array.next(pos)
    assert pos.epoch >= 1


@pytest.fixture
def books(tmp_path):
    """A folder of three 'books' of different sizes and words."""
    folder = tmp_path / "books"
    folder.mkdir()
    for name, seed, size in (("a.txt", 1, 3000), ("b.txt", 2, 9000), ("c.txt", 3, 6000)):
        (folder / name).write_text(make_text(seed, size), encoding="utf-8")
    return folder


def test_a_folder_validates_on_the_last_tenth_of_every_file(books, tmp_path):
    trainer = Trainer(tiny_train_config(books, tmp_path / "run", max_iters=1), tiny_model_config())
    decode = trainer.tokenizer.decode
    val = decode(trainer.val_tokens[0 : len(trainer.val_tokens)].tolist())
    train_text = decode(trainer.train_tokens[0 : len(trainer.train_tokens)].tolist())
    rest_train, rest_val = train_text, val
    for name in ("a.txt", "b.txt", "c.txt"):
        text = (books / name).read_text(encoding="utf-8")
        text += "" if text.endswith("\n") else "\n"  # each file of a folder ends its own line
        # Each file is cut once, just after a line near 90%: its head trains, its tail validates.
        near = [k + 1 for k, ch in enumerate(text) if ch == "\n" and abs(k + 1 - 0.9 * len(text)) < 0.03 * len(text)]
        (cut,) = [c for c in near if rest_train.startswith(text[:c]) and rest_val.startswith(text[c:])]
        rest_train, rest_val = rest_train[cut:], rest_val[len(text) - cut :]
    assert rest_train == rest_val == ""  # nothing lost, nothing read twice
    assert "(the last 10% of each of its 3 files validates)" in trainer.describe()
    assert trainer.data_record["validation"] == {"source": str(books), "part": "the last 10% of each of its 3 files"}


def test_val_data_validates_in_full_and_its_loss_is_what_score_measures(corpus_file, tmp_path, capsys):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(make_text(seed=9, n_chars=1500), encoding="utf-8")
    result = train(tiny_train_config(corpus_file, tmp_path / "run", val_data=str(held_out)), tiny_model_config())
    capsys.readouterr()  # the run's own lines
    meta = json.loads((result.best / "config.json").read_text(encoding="utf-8"))
    # --data trains on all of its own text; --val-data validates in full.
    assert meta["data"]["sources"] == [
        {"source": str(corpus_file), "chars": 8000, "files": 1, "sha256": hashlib.sha256(corpus_file.read_bytes()).hexdigest()}
    ]
    assert meta["data"]["validation"] == {
        "source": str(held_out),
        "chars": 1500,
        "files": 1,
        "sha256": hashlib.sha256(held_out.read_bytes()).hexdigest(),
        "part": "all of it",
        "unknown_chars": 0,
    }
    assert score.main(["--checkpoint", str(result.best), "--device", "cpu", "--json", str(held_out)]) == 0
    scored = json.loads(capsys.readouterr().out)["total"]["nats_per_char"]
    assert scored == pytest.approx(result.best_val_loss, abs=1e-5)
    # Without files, score measures what the run validated on: the same figure.
    assert score.main(["--checkpoint", str(result.best), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["nats_per_char"] == pytest.approx(scored, abs=1e-6)


def test_a_datasets_own_validation_split_validates_and_train_trains_in_full(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    rows = {"train": make_text(1, 6000).split("\n\n"), "validation": make_text(2, 1200).split("\n\n")}
    for split, texts in rows.items():
        (ds / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    data = read_run_data(f"hf:{ds}")
    decode = data.tokenizer.decode
    assert decode(data.train.tolist()) == "\n".join(rows["train"])  # all of train trains
    assert decode(data.val.tolist()) == "\n".join(rows["validation"])
    assert data.validates == f"all of the 'validation' split of hf:{ds}"
    assert data.record["validation"]["split"] == "validation"
    # Without a held-out split, the last 10% of train validates, as before.
    (ds / "validation.jsonl").unlink()
    assert read_run_data(f"hf:{ds}").validates == "its last 10%"


def test_validation_characters_training_never_saw_are_counted_and_said(corpus_file, tmp_path):
    odd = tmp_path / "odd.txt"
    odd.write_text("ROMEO: the king 0123456789\n" * 10, encoding="utf-8")  # the corpus has no digits
    data = read_run_data(str(corpus_file), val_data=str(odd))
    assert data.record["validation"]["unknown_chars"] == 100
    assert data.notes == (
        f"note: 100 characters of --val-data {odd} (37.04%) never occur in the training text and read as <unk>; "
        "they count in the validation loss",
    )


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: d / "missing.txt", "--val-data {p}: corpus '{p}' not found"),
        (lambda d: _write(d / "empty.txt", ""), "--val-data {p}: {p} is empty"),
        (lambda d: _write(d / "digits.txt", "0123456789" * 5), "--val-data {p} shares no character with the training text"),
        (lambda d: _write(d / "one.txt", "a"), "--val-data {p} has 1 characters: a validation text needs at least 2"),
    ],
    ids=["missing", "empty", "no character in common", "one character"],
)
def test_a_bad_val_data_is_one_sentence_and_exit_2_before_training(corpus_file, subprocess_env, tmp_path, make, fragment):
    path = make(tmp_path)
    out = tmp_path / "run"
    proc = run_python(
        [TRAIN_SCRIPT, "--data", corpus_file, "--val-data", path, "--out", out, "--max-iters", "5", *TINY_TRAIN_FLAGS],
        subprocess_env,
        tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert fragment.format(p=path) in line and "Traceback" not in proc.stderr
    assert not out.exists()  # nothing trained, nothing written


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_the_validation_line_says_how_many_files_and_characters(books, subprocess_env, tmp_path):
    proc = run_python(
        [TRAIN_SCRIPT, "--data", books, "--out", tmp_path / "run", "--max-iters", "2", "--eval-interval", "2", *TINY_TRAIN_FLAGS],
        subprocess_env,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "val chars (the last 10% of each of its 3 files validates)" in proc.stderr


# --- several corpora ------------------------------------------------------------------------------


def _letters(seed: int, alphabet: str, n: int) -> str:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list(alphabet), rng.integers(2, 7))) for _ in range(n // 4)]
    return ("\n".join(" ".join(words[i : i + 8]) for i in range(0, len(words), 8)) + "\n")[:n]


@pytest.fixture
def two_corpora(tmp_path):
    """A small corpus of the letters a-m and one four times larger of n-z: each character tells its corpus."""
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text(_letters(1, "abcdefghijklm", 3000), encoding="utf-8")
    large.write_text(_letters(2, "nopqrstuvwxyz", 12000), encoding="utf-8")
    return small, large


def test_a_mix_draws_its_shares_in_every_batch_and_every_process(two_corpora):
    small, large = map(str, two_corpora)
    data = read_run_data([small, large], mix=[0.5, 0.5])
    first_of_large = int(data.tokenizer.encode("n")[0])  # the vocabulary is sorted: n-z come after a-m and ' ', '\n'

    def share_of_small(batch):
        letters = batch[batch > int(data.tokenizer.encode(" ")[0])]
        return float((letters < first_of_large).float().mean())

    # Two processes of 4 rows each read the rows of one process of 8.
    ranks = [BatchStreams(data.train, 8, 16, seed=5, rows=slice(r * 4, (r + 1) * 4)) for r in range(2)]
    whole = BatchStreams(data.train, 8, 16, seed=5)
    pos, shares, small_seen = StreamPosition(), [], 0
    for _ in range(300):  # several epochs: the small corpus is read twice per epoch
        x, _ = whole.get(pos)
        parts = [r.get(pos)[0] for r in ranks]
        assert x.equal(torch.cat(parts))
        assert all(0.3 < share_of_small(p) < 0.7 for p in parts)  # every process reads both corpora
        shares.append(share_of_small(x))
        small_seen += int((x[x > 2] < first_of_large).sum())
        pos = whole.next(pos)
    assert pos.epoch >= 3
    assert abs(np.mean(shares) - 0.5) < 0.03  # the shares hold over the run
    # Without --mix, the corpora are one concatenation: each read once an epoch, in proportion to its size.
    plain = read_run_data([small, large])
    assert len(plain.train) == len(data.train) and plain.record["sources"][0]["share"] == pytest.approx(0.2, abs=0.01)


def test_a_mixed_run_resumes_bit_exactly_and_reports_each_corpus(two_corpora, tmp_path):
    small, large = map(str, two_corpora)

    def config(out, **overrides):  # about 26 steps an epoch: the crash and the resume are in the second
        return tiny_train_config((small, large), out, mix=(0.3, 0.7), max_iters=40, eval_interval=10, batch_size=16,
                                 seq_len=32, **overrides)  # fmt: skip

    whole = train(config(tmp_path / "whole"), tiny_model_config())
    with pytest.raises(RuntimeError, match="injected"):
        train(config(tmp_path / "split"), tiny_model_config(), callbacks=[MetricsLog(), CrashAt(33)])
    resumed = train(config(tmp_path / "split", resume=str(tmp_path / "split")), tiny_model_config())
    assert resumed.step == 40
    a, b = load_file(whole.last / "model.safetensors"), load_file(resumed.last / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)

    meta = json.loads((whole.last / "config.json").read_text(encoding="utf-8"))
    assert [(s["source"], s["share"]) for s in meta["data"]["sources"]] == [(small, 0.3), (large, 0.7)]
    assert [v["source"] for v in meta["data"]["validation"]] == [small, large]
    evals = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "val_loss" in e]
    each = evals[-1]["val_loss_by_corpus"]
    assert set(each) == {small, large}
    sizes = [len(Path(p).read_text(encoding="utf-8")) // 10 for p in (small, large)]  # about each validation part
    expected = (each[small] * sizes[0] + each[large] * sizes[1]) / sum(sizes)
    assert evals[-1]["val_loss"] == pytest.approx(expected, rel=1e-2)  # weighted by size
    card = model_card(whole.best, "someone/mixed").text  # the Hub card names both, with their shares
    assert "| `small.txt`, share 30% | 3,000 | 1 |" in card and "| `large.txt`, share 70% | 12,000 | 1 |" in card
    assert "trained with\ncharrnn on `small.txt` and `large.txt`." in card
    assert "Validated on each corpus's own validation part, weighted by size." in card


@pytest.mark.parametrize(
    "mix, fragment",
    [
        ("0.5", "--mix gives 1 shares for 2 corpora: give one share per --data source"),
        ("0.5,-1", "--mix shares must be numbers >= 0, not all zero"),
        ("0,0", "--mix shares must be numbers >= 0, not all zero"),
        ("half,half", "mix must be numbers separated by commas"),
    ],
)
def test_a_bad_mix_is_one_sentence_and_exit_2(two_corpora, subprocess_env, tmp_path, mix, fragment):
    small, large = two_corpora
    out = tmp_path / "run"
    proc = run_python(
        [TRAIN_SCRIPT, "--data", small, "--data", large, "--mix", mix, "--out", out, "--max-iters", "5", *TINY_TRAIN_FLAGS],
        subprocess_env,
        tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert fragment in line and "Traceback" not in proc.stderr
    assert not out.exists()


def test_two_corpora_from_the_command_line_log_each_ones_loss(two_corpora, subprocess_env, tmp_path):
    small, large = two_corpora
    proc = run_python(
        [TRAIN_SCRIPT, "--data", small, "--data", large, "--mix", "1,1", "--out", tmp_path / "run", "--max-iters", "4",
         "--eval-interval", "4", *TINY_TRAIN_FLAGS],
        subprocess_env,
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "(the validation part of each of its 2 corpora validates)" in proc.stderr
    assert re.search(r"step +4 \| val [\d.]+ nats/char \([\d.]+ bpc\) \[small [\d.]+, large [\d.]+\] \(best\)", proc.stdout)

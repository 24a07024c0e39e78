"""Fine-tuning (--init-from): a new run from a trained model's weights and vocabulary."""

from __future__ import annotations

import json

import pytest
from conftest import make_text, tiny_train_config

import charrnn
from charrnn.checkpoint import load_checkpoint
from charrnn.cli import train as train_cli
from charrnn.config import ModelConfig
from charrnn.errors import ConfigError
from charrnn.training.trainer import train

# A second text in the same style with characters the first never had (digits, an accent, '!').
NEW_TEXT_EXTRA = "\nKING:\nthe 3 queens sang 42 songs in the café!\n\n"


@pytest.fixture(scope="module")
def new_corpus(tmp_path_factory):
    text = make_text(seed=7, n_chars=5000)
    parts = text.split("\n\n")
    text = "\n\n".join(p + (NEW_TEXT_EXTRA if i % 10 == 0 else "") for i, p in enumerate(parts))
    path = tmp_path_factory.mktemp("new_corpus") / "new.txt"
    path.write_text(text, encoding="utf-8")
    return path


def _config(data, out, **overrides):
    values = dict(max_iters=30, eval_interval=30, batch_size=8, seq_len=32)
    values.update(overrides)
    return tiny_train_config(data, out, **values)


def test_fine_tuning_beats_training_from_scratch_in_the_same_steps(trained_run, new_corpus, tmp_path):
    scratch = train(
        _config(new_corpus, tmp_path / "scratch"), ModelConfig(n_layers=2, hidden_size=32, embedding_size=16, dropout=0.0)
    )
    tuned = train(_config(new_corpus, tmp_path / "tuned", init_from=str(trained_run.best)))
    assert tuned.step == scratch.step == 30  # a fresh step count, not the trained run's 600
    # The tiny model learns this text in hundreds of steps; 30 from its start weights are a head start.
    assert tuned.best_val_loss < scratch.best_val_loss - 0.3, (tuned.best_val_loss, scratch.best_val_loss)
    print(f"after 30 steps: fine-tuned {tuned.best_val_loss:.4f}, from scratch {scratch.best_val_loss:.4f} nats/char")


def test_new_characters_grow_the_vocabulary_and_keep_the_old_ids(trained_run, new_corpus, tmp_path):
    base = load_checkpoint(trained_run.best)
    result = train(_config(new_corpus, tmp_path / "grow", max_iters=10, eval_interval=10, init_from=str(trained_run.best)))
    tuned = load_checkpoint(result.best)
    old = base.tokenizer.chars
    assert tuned.tokenizer.chars[: len(old)] == old
    assert set(tuned.tokenizer.chars[len(old) :]) == {"3", "4", "2", "é", "!", "f"} - set(old)
    assert tuned.model.config.vocab_size == tuned.tokenizer.vocab_size
    meta = json.loads((result.best / "config.json").read_text())
    assert meta["init_from"] == str(trained_run.best) and meta["train"]["init_from"] == str(trained_run.best)
    sampler = charrnn.load(result.best, device="cpu")
    assert len(sampler.generate("KING:\n", length=50, seed=1)) == 50
    assert sampler.score("the café!") > 0  # the new characters are characters of the model now, no <unk>


def test_unk_policy_keeps_the_vocabulary(trained_run, new_corpus, tmp_path, capsys):
    result = train(
        _config(new_corpus, tmp_path / "unk", max_iters=10, eval_interval=10, init_from=str(trained_run.best), new_chars="unk")
    )
    assert load_checkpoint(result.best).tokenizer.chars == load_checkpoint(trained_run.best).tokenizer.chars
    assert "read as <unk> (--new-chars unk)" in capsys.readouterr().err


def test_a_shape_flag_that_contradicts_the_checkpoint_is_a_one_line_error(trained_run, new_corpus, tmp_path, capsys):
    argv = ["--data", str(new_corpus), "--init-from", str(trained_run.best), "--hidden-size", "64", "--max-iters", "5",
            "--max-time", "0", "--out", str(tmp_path / "bad"), "--device", "cpu"]  # fmt: skip
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"error: --hidden-size 64 contradicts --init-from {trained_run.best}, whose model has 32: "
        "a fine-tuned run keeps the trained model's shape; drop the flag"
    )
    assert not (tmp_path / "bad").exists()


def test_init_from_and_resume_together_are_an_error(trained_run, new_corpus, tmp_path):
    with pytest.raises(ConfigError, match="give one of them"):
        _config(new_corpus, tmp_path / "x", init_from=str(trained_run.best), resume=str(trained_run.last))


def test_a_fine_tuned_run_resumes(trained_run, new_corpus, tmp_path):
    out = tmp_path / "tuned"
    train(_config(new_corpus, out, max_iters=10, eval_interval=10, init_from=str(trained_run.best)))
    resumed = train(_config(new_corpus, out, max_iters=20, eval_interval=10, resume=str(out / "last")))
    assert resumed.step == 20
    assert json.loads((out / "last" / "config.json").read_text())["init_from"] == str(trained_run.best)

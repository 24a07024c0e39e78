"""Training: the loss falls, clipping bounds the gradient, checkpoints reload exactly, evaluation agrees."""

from __future__ import annotations

import json
import math
import random
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_text, tiny_model_config, tiny_train_config

import charrnn
from charrnn.checkpoint import load_checkpoint, save_checkpoint
from charrnn.evaluation import evaluate
from charrnn.model import CharRNN
from charrnn.tokenizer import CharTokenizer
from charrnn.training.callbacks import ConsoleReport
from charrnn.training.signals import StopSignal
from charrnn.training.trainer import Trainer, train


def _read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_loss_falls_on_a_repetitive_corpus(tmp_path):
    corpus = tmp_path / "repeat.txt"
    corpus.write_text("abcdefghij klmnop\n" * 200, encoding="utf-8")
    config = tiny_train_config(corpus, tmp_path / "run", max_iters=60, eval_interval=30, batch_size=8, seq_len=16)
    result = train(config, tiny_model_config(n_layers=1, hidden_size=32, embedding_size=8))

    assert result.step == 60
    records = _read_metrics(result.run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 60
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] > math.log(19) * 0.8  # starts near chance (19 tokens incl. <unk>)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [30, 60]
    assert vals[-1]["val_loss"] < losses[0]
    assert vals[-1]["val_bpc"] == pytest.approx(vals[-1]["val_loss"] / math.log(2))
    for name in ("best", "last"):
        for file in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (result.run_dir / name / file).is_file()


def _first_step_gradients(corpus_file, tmp_path, grad_clip):
    """Run Trainer.train_step once and capture the gradients the optimizer is handed."""
    trainer = Trainer(
        tiny_train_config(corpus_file, tmp_path / f"run-{grad_clip}", grad_clip=grad_clip, lr=1e-2),
        tiny_model_config(),
    )
    seen = []
    real_step = trainer.optimizer.step

    def spying_step(*args, **kwargs):
        seen.append([p.grad.detach().clone() for p in trainer.model.parameters()])
        return real_step(*args, **kwargs)

    trainer.optimizer.step = spying_step
    trainer.train_step()
    assert len(seen) == 1
    return seen[0]


def _global_norm(grads):
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def test_gradient_clipping_bounds_the_global_norm(corpus_file, tmp_path):
    clip = 0.05
    raw = _first_step_gradients(corpus_file, tmp_path, grad_clip=0.0)  # same seed, same batch, no clipping
    clipped = _first_step_gradients(corpus_file, tmp_path, grad_clip=clip)
    raw_norm, clipped_norm = _global_norm(raw), _global_norm(clipped)
    assert raw_norm > 2 * clip, "the test needs a gradient larger than the clip"
    assert clipped_norm <= clip * (1 + 1e-5)
    assert clipped_norm == pytest.approx(clip, rel=1e-3)
    # Clipping rescales the whole gradient; it does not change its direction.
    for r, c in zip(raw, clipped):
        torch.testing.assert_close(c, r * (clip / raw_norm), atol=1e-7, rtol=1e-4)


def test_train_step_advances_the_stream_and_carries_the_hidden_state(corpus_file, tmp_path):
    trainer = Trainer(tiny_train_config(corpus_file, tmp_path / "run"), tiny_model_config())
    assert trainer.hidden is None
    loss = trainer.train_step()
    assert math.isfinite(loss)
    assert trainer.step == 1
    assert trainer.position == charrnn.data.streams.StreamPosition(0, 1)
    h, c = trainer.hidden
    assert h.shape == c.shape == (2, 8, 32)
    assert not h.requires_grad  # detached between truncated-BPTT chunks


def _tiny_model_and_tokenizer(cell="gru"):
    text = make_text(seed=5, n_chars=500)
    tok = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    model = CharRNN(tiny_model_config(cell=cell, vocab_size=tok.vocab_size, dropout=0.1)).eval()
    return model, tok, torch.from_numpy(tok.encode(text[:200]).astype(np.int64))[None]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_saved_and_reloaded_model_gives_identical_logits(tmp_path, cell):
    model, tok, idx = _tiny_model_and_tokenizer(cell)
    with torch.no_grad():
        expected, _ = model(idx)
    path = save_checkpoint(tmp_path / "ckpt", model, tok, {"step": 7})
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (path / name).is_file()

    ckpt = load_checkpoint(path)
    assert ckpt.tokenizer.chars == tok.chars
    assert ckpt.model.config == model.config
    assert ckpt.meta["step"] == 7
    assert not ckpt.model.training
    with torch.no_grad():
        assert torch.equal(ckpt.model(idx)[0], expected)

    sampler = charrnn.load(path, device="cpu")
    assert sampler.tokenizer.chars == tok.chars
    with torch.no_grad():
        assert torch.equal(sampler.model(idx)[0], expected)


def test_trained_checkpoint_reloads_with_identical_logits(trained_run, corpus_text):
    """The run's best checkpoint, loaded twice (by path and by run directory), gives identical logits."""
    a = load_checkpoint(trained_run.best)
    b = charrnn.load(trained_run.run_dir, device="cpu")  # a run dir resolves to its best
    idx = torch.from_numpy(a.tokenizer.encode(corpus_text[:300]).astype(np.int64))[None]
    with torch.no_grad():
        assert torch.equal(a.model(idx)[0], b.model(idx)[0])
    assert a.meta["best_val_loss"] == pytest.approx(trained_run.best_val_loss)
    last = load_checkpoint(trained_run.last, with_training_state=True)
    assert last.meta["step"] == trained_run.step == 600
    assert last.has_training_state


def test_trained_model_beats_chance(trained_run):
    vocab = len(load_checkpoint(trained_run.best).tokenizer)
    assert trained_run.best_val_loss < 0.6 * math.log(vocab)


def test_evaluate_columns_agree_with_single_stream(sampler):
    model = sampler.model
    tokens = sampler.tokenizer.encode(make_text(seed=42, n_chars=3000))
    assert not (tokens == 0).any()  # no unknown characters: this is training-like text
    single = evaluate(model, tokens, columns=1)
    multi = evaluate(model, tokens, columns=8, warmup=64)
    assert math.isfinite(single) and single > 0
    assert abs(multi - single) < 2e-3, (multi, single)


def test_single_stream_evaluate_is_the_mean_cross_entropy(sampler):
    model = sampler.model
    tokens = sampler.tokenizer.encode(make_text(seed=43, n_chars=700))
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])
        expected = F.cross_entropy(logits[0], ids[1:]).item()
    assert evaluate(model, tokens, columns=1, chunk=64) == pytest.approx(expected, abs=1e-5)
    assert not model.training  # evaluate restores the mode it found (eval here)


def test_a_finished_run_draws_its_loss_curves(tmp_path, corpus_file, capsys):
    from charrnn.training.trainer import train

    result = train(tiny_train_config(corpus_file, tmp_path / "run", plot=True), tiny_model_config())
    png = result.run_dir / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot:    {png}" in capsys.readouterr().err


def test_the_signal_handler_only_records_and_the_console_callback_says_it(capsys):
    """The handler prints nothing (it runs between any two bytecodes); the callbacks report, in today's words."""
    stop = StopSignal()
    stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGTERM, None)
    assert capsys.readouterr().err == ""
    assert stop.signum == signal.SIGINT  # the first decides
    assert stop.unreported() == [(signal.SIGINT, False), (signal.SIGTERM, True)]
    assert stop.unreported() == []  # each is reported once
    stop._handle(signal.SIGINT, None)
    assert stop.unreported() == [(signal.SIGINT, True)]

    report = ConsoleReport()
    for elastic, also in ((False, ""), (True, " if every process is still there")):
        report.on_signal(SimpleNamespace(dist=SimpleNamespace(elastic=elastic)), signal.SIGTERM, False)
        assert capsys.readouterr().err == f"\nSIGTERM: stopping after this step and saving a checkpoint{also}...\n"
    report.on_signal(SimpleNamespace(dist=SimpleNamespace(elastic=False)), signal.SIGINT, True)
    assert capsys.readouterr().err == "\nSIGINT again: ignored, so that the checkpoint save completes\n"


def test_patience_ends_a_memorising_run_and_says_what_would_help(tmp_path):
    # Random characters: the validation part has nothing to learn beyond their frequencies,
    # so once a wide model with a large step starts memorising the training part, val rises.
    rng = random.Random(0)
    corpus = tmp_path / "noise.txt"
    corpus.write_text("".join(rng.choice("abcdefghij") for _ in range(4000)), encoding="utf-8")
    result = train(
        tiny_train_config(corpus, tmp_path / "run", max_iters=2000, eval_interval=5, patience=3, lr=2e-2, min_lr=2e-2),
        tiny_model_config(hidden_size=128),
        callbacks=[],
    )
    assert result.step < 2000
    assert result.stop_reason.startswith("no improvement in 3 evaluations (--patience: the model began to memorise")
    assert "more time does not" in result.stop_reason and "--weight-drop" in result.stop_reason
    assert result.stop_reason.endswith("so it stopped")  # the summary reads on: " at step N; best val ..."
    assert (result.best / "config.json").is_file()

"""charrnn export --onnx: the one-character step in ONNX, checked with onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from charrnn.cli import export

PROMPT = "ROMEO:\n"


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    assert export.main(["--onnx", str(trained_run.best), "--out", str(out)]) == 0
    return out


def _session(folder):
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def test_the_step_gives_the_models_logits_over_200_steps(exported, sampler, corpus_text):
    session = _session(exported)
    assert [i.name for i in session.get_inputs()] == ["token", "h", "c"]
    assert [o.name for o in session.get_outputs()] == ["logits", "h_out", "c_out"]
    ids = sampler.tokenizer.encode(corpus_text[:200]).astype(np.int64)
    with torch.no_grad():  # the reference: the whole sequence through the model's forward pass
        expected, _ = sampler.model(torch.from_numpy(ids)[None])
    config = sampler.model.config
    h = np.zeros((config.n_layers, 1, config.hidden_size), np.float32)
    c = np.zeros_like(h)
    worst = 0.0
    for t, token in enumerate(ids):
        logits, h, c = session.run(None, {"token": np.array([token]), "h": h, "c": c})
        worst = max(worst, float(np.abs(logits[0] - expected[0, t].numpy()).max()))
    assert worst < 1e-4, worst


def test_greedy_decoding_from_onnx_is_sampler_generate_at_temperature_0(exported, sampler):
    vocab = json.loads((exported / "vocab.json").read_text(encoding="utf-8"))
    chars = ["\ufffd", *vocab["chars"]]
    index = {ch: i for i, ch in enumerate(chars)}
    session = _session(exported)
    h = np.zeros((vocab["n_layers"], 1, vocab["hidden_size"]), np.float32)
    c = np.zeros_like(h)
    for ch in PROMPT:
        logits, h, c = session.run(None, {"token": np.array([index[ch]]), "h": h, "c": c})
    text = ""
    for _ in range(200):
        token = int(logits[0].argmax())
        text += chars[token]
        logits, h, c = session.run(None, {"token": np.array([token]), "h": h, "c": c})
    assert text == sampler.generate(PROMPT, length=200, temperature=0)


def test_batches_of_streams_run_through_one_call(exported, sampler):
    session = _session(exported)
    config = sampler.model.config
    h = np.zeros((config.n_layers, 3, config.hidden_size), np.float32)
    logits, h_out, c_out = session.run(None, {"token": np.array([1, 2, 3]), "h": h, "c": h})
    assert logits.shape == (3, config.vocab_size) and h_out.shape == h.shape


def test_a_gru_exports_with_h_alone(tmp_path, corpus_file):
    from conftest import tiny_model_config, tiny_train_config

    from charrnn.training.trainer import train

    run = train(tiny_train_config(corpus_file, tmp_path / "gru", max_iters=5, eval_interval=5), tiny_model_config(cell="gru"))
    assert export.main(["--onnx", str(run.run_dir)]) == 0
    session = _session(run.run_dir / "onnx")
    assert [i.name for i in session.get_inputs()] == ["token", "h"]


def test_export_without_a_format_or_checkpoint_is_a_sentence(trained_run, tmp_path, capsys):
    assert export.main([str(trained_run.best)]) == 2
    assert "choose a format: --onnx" in capsys.readouterr().err
    assert export.main(["--onnx", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["fifo", "link to a fifo"])
def test_an_output_that_is_not_a_regular_file_is_refused_before_anything_is_written(trained_run, tmp_path, capsys, kind):
    import os

    out = tmp_path / "out"
    out.mkdir()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # opening it to write would block until a reader came: it must never be opened
    if kind == "fifo":
        os.rename(fifo, out / "tokenizer.json")
    else:
        (out / "tokenizer.json").symlink_to(fifo)
    assert export.main(["--onnx", str(trained_run.best), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and "it is a FIFO" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]  # no model.onnx, no vocab.json

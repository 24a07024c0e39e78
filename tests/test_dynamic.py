"""Dynamic evaluation: honest (scored before learning), on a copy, and reported apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from charrnn.cli import score
from charrnn.evaluation import dynamic_evaluate, evaluate


def _ids(sampler, text: str) -> np.ndarray:
    return sampler.encode_prompt(text, allow_empty=False).cpu().numpy()


def test_with_no_learning_it_is_the_single_stream_loss_and_the_model_is_untouched(sampler, corpus_text):
    ids = _ids(sampler, corpus_text[:3000])
    before = {k: v.clone() for k, v in sampler.model.state_dict().items()}
    assert dynamic_evaluate(sampler.model, ids, lr=0.0) == pytest.approx(evaluate(sampler.model, ids, columns=1), abs=1e-5)
    dynamic_evaluate(sampler.model, ids, lr=0.05)
    assert all(torch.equal(before[k], v) for k, v in sampler.model.state_dict().items())


def test_learning_from_what_it_read_helps_on_text_that_repeats_itself(sampler):
    text = "quickly a big queen flew under the red tree. " * 60  # one sentence the corpus never had, over and over
    static = sampler.score(text)
    dynamic = sampler.score(text, dynamic=True, dynamic_lr=0.05)
    assert dynamic < static - 0.1


def test_score_command_prints_both_figures(trained_run, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("ROMEO:\nthe cat sat on the mat.\n\n" * 20, encoding="utf-8")
    code = score.main(["--checkpoint", str(trained_run.best), "--text-file", str(text), "--dynamic", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert "nats/char" in out.splitlines()[0] and "dynamic evaluation (lr 0.1)" in out.splitlines()[1]


def test_score_command_on_the_validation_split_by_default(trained_run, capsys):
    assert score.main(["--checkpoint", str(trained_run.best), "--device", "cpu"]) == 0
    assert "the validation split of" in capsys.readouterr().out


def test_score_command_names_a_missing_file(trained_run, tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert score.main(["--checkpoint", str(trained_run.best), "--text-file", str(missing)]) == 2
    assert f"cannot read --text-file {missing}: no such file" in capsys.readouterr().err

"""Sizing a run to its budget: what auto chooses, and that a user's setting always wins."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import make_text, tiny_train_config

from charrnn.cli.train import build_parser
from charrnn.config import ModelConfig, TrainConfig
from charrnn.errors import ConfigError
from charrnn.model import CharRNN
from charrnn.training import sizing
from charrnn.training.sizing import CANDIDATES, choose_size, dropout_for, flops_per_char, plan_run, step_weights
from charrnn.training.trainer import Trainer

CPU = torch.device("cpu")
AUTO = dict(batch_size=None, seq_len=None, lr=None, min_lr=None, warmup_iters=None)


def step_budget(iters: int, **overrides) -> TrainConfig:
    return TrainConfig(data="x", max_iters=iters, max_time=0, **overrides)


def test_a_bigger_budget_never_buys_a_smaller_model():
    model = ModelConfig(vocab_size=65)
    sizes = [
        step_weights(*choose_size(lambda h, n, c=chars: c, model, corpus_chars=10**9), 64, 65)
        for chars in (1e5, 1e6, 3e6, 1e7, 1e8, 1e9)
    ]
    assert sizes == sorted(sizes)
    assert sizes[0] < sizes[-1]  # the rule does choose: tiny budgets get small models, big ones big models


def test_a_small_corpus_caps_the_model():
    model = ModelConfig(vocab_size=65)
    big = choose_size(lambda h, n: 1e12, model, corpus_chars=10**9)
    small = choose_size(lambda h, n: 1e12, model, corpus_chars=10_000)
    assert big == CANDIDATES[-1] and small == CANDIDATES[0]


def test_a_step_budget_plans_without_a_probe_and_the_same_way_twice():
    model = ModelConfig(vocab_size=65)
    plans = [plan_run(step_budget(2000), model, 1_000_000, CPU, torch.float32) for _ in range(2)]
    assert plans[0] == plans[1]
    plan = plans[0]
    assert plan.probe_seconds == 0 and plan.chars_per_second is None
    assert plan.config.warmup_iters == 40  # 2% of the 2,000 steps
    assert plan.config.min_lr == pytest.approx(plan.config.lr / 10)
    assert not plan.model.unresolved
    assert f"{plan.model.n_layers}x{plan.model.hidden_size} chosen for 2,000 steps" in plan.reason


def test_dropout_rises_with_the_epochs_and_a_noisy_probe_moves_it_little():
    epochs = [e / 10 for e in range(400)]
    rates = [dropout_for(e) for e in epochs]
    assert rates == sorted(rates)
    assert dropout_for(3.9) == 0.0 and dropout_for(8) == 0.1 and dropout_for(30) == 0.4
    # A probe 15% off (the noise measured on a shared 2-core machine) changes the rate by at most 0.1.
    assert all(abs(dropout_for(1.15 * e) - dropout_for(e)) <= 0.1 for e in epochs if e > 5)


def test_the_probe_times_the_chosen_size_with_the_dropout_it_will_get(monkeypatch):
    timed = []

    def speed(model, *args):  # a machine of 1 TFLOP/s, whatever it runs
        timed.append(model)
        return 1e12 / flops_per_char(model)

    monkeypatch.setattr(sizing, "measure_speed", speed)
    config = TrainConfig(data="x", max_time=300.0, max_iters=0)
    plan = plan_run(config, ModelConfig(vocab_size=65), 1_000_000, CPU, torch.float32)
    assert plan.model.dropout > 0  # the run rereads the corpus, so dropout is on ...
    chosen = timed[-1]  # ... and the chosen size was timed with it, since dropout costs time
    assert (chosen.hidden_size, chosen.n_layers, chosen.dropout) == (
        plan.model.hidden_size,
        plan.model.n_layers,
        plan.model.dropout,
    )


def test_what_the_user_gives_wins():
    model = ModelConfig(vocab_size=65, hidden_size=96, dropout=0.3)
    config = step_budget(500, batch_size=7, lr=1e-3, warmup_iters=3)
    plan = plan_run(config, model, 1_000_000, CPU, torch.float32)
    assert (plan.model.hidden_size, plan.model.dropout) == (96, 0.3)
    assert (plan.config.batch_size, plan.config.lr, plan.config.warmup_iters) == (7, 1e-3, 3)
    assert plan.model.n_layers in {n for _, n in CANDIDATES}  # the one setting left at auto


def test_a_time_budget_probes_this_machine_and_counts_the_probe():
    model = ModelConfig(vocab_size=40, embedding_size=8)
    config = TrainConfig(data="x", max_time=5.0, max_iters=0)
    plan = plan_run(config, model, 2_000, CPU, torch.float32)
    assert plan.probe_seconds > 0 and plan.chars_per_second > 0
    assert "chosen for 5 s at " in plan.reason
    CharRNN(plan.model)  # a complete model config


def test_a_model_cannot_be_built_while_its_size_is_auto():
    with pytest.raises(ValueError, match="hidden_size.*auto"):
        CharRNN(ModelConfig(vocab_size=10, n_layers=1, dropout=0.0))


def test_auto_on_the_command_line():
    args = build_parser().parse_args(["--hidden-size", "auto", "--n-layers", "3", "--lr", "auto"])
    assert (args.hidden_size, args.n_layers, args.lr, args.batch_size) == (None, 3, None, None)
    assert "(default: auto)" in build_parser().format_help()


def test_the_trainer_runs_what_the_plan_chose(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text(0, 20_000), encoding="utf-8")
    config = replace(tiny_train_config(corpus, tmp_path / "run", max_iters=3), **AUTO)
    trainer = Trainer(config, ModelConfig(embedding_size=8))
    assert trainer.config.batch_size == 32 and trainer.config.seq_len == 64
    assert (trainer.model_config.hidden_size, trainer.model_config.n_layers) == CANDIDATES[0]  # 18k chars: the smallest
    result = trainer.run()
    assert result.step == 3


def test_a_given_min_lr_above_the_chosen_lr_is_refused():
    with pytest.raises(ConfigError, match="min_lr must be in"):
        plan_run(step_budget(100, min_lr=1.0), ModelConfig(vocab_size=65), 1_000_000, CPU, torch.float32)


def test_a_time_budget_with_everything_given_neither_probes_nor_guesses_steps():
    model = ModelConfig(vocab_size=65, hidden_size=64, n_layers=1, dropout=0.0)
    config = TrainConfig(data="x", max_time=60.0, batch_size=8, seq_len=16, lr=1e-3, min_lr=1e-4, warmup_iters=5, eval_interval=7)
    plan = plan_run(config, model, 1_000_000, CPU, torch.float32)
    assert plan.probe_seconds == 0 and plan.config == config and plan.model == model
    assert "given for 60 s on a 1.0M-char corpus: steps of 8x16, lr 0.001" in plan.reason

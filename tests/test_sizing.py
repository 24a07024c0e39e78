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
    model = ModelConfig(
        vocab_size=65, hidden_size=64, n_layers=1, dropout=0.0, input_dropout=0.0, embedding_dropout=0.0, weight_drop=0.0
    )
    config = TrainConfig(data="x", max_time=60.0, batch_size=8, seq_len=16, lr=1e-3, min_lr=1e-4, warmup_iters=5, eval_interval=7)
    plan = plan_run(config, model, 1_000_000, CPU, torch.float32)
    assert plan.probe_seconds == 0 and plan.config == config and plan.model == model
    assert "given for 60 s on a 1.0M-char corpus: steps of 8x16, lr 0.001" in plan.reason


def test_a_small_corpus_read_many_times_gets_a_larger_model_with_weight_drop():
    # 135k training characters and a budget that reads them hundreds of times: data, not
    # compute, limits the run, so it takes a model above 4 weights per character, regularised.
    model = ModelConfig(vocab_size=96)
    corpus = 135_000
    compute_only = choose_size(lambda h, n: 3 * 10**6, model, corpus)  # about 22 epochs: the compute rule
    data_limited = choose_size(lambda h, n: 10**8, model, corpus)
    weights = step_weights(*data_limited, 64, 96)
    assert step_weights(*compute_only, 64, 96) <= sizing.MAX_WEIGHTS_PER_CHAR * corpus
    assert sizing.MAX_WEIGHTS_PER_CHAR * corpus < weights <= sizing.REGULARISED_WEIGHTS_PER_CHAR * corpus
    plan = plan_run(
        step_budget(10**8 // 2048),
        replace(model, hidden_size=data_limited[0], n_layers=data_limited[1]),
        corpus,
        CPU,
        torch.float32,
    )
    assert {name: getattr(plan.model, name) for name in sizing.AWD_RATES} == sizing.AWD_RATES
    assert "weight drop 0.4" in plan.reason


def test_a_user_fixed_large_model_on_a_small_corpus_is_regularised_and_the_users_rates_stay():
    model = ModelConfig(vocab_size=96, hidden_size=512, n_layers=2, dropout=0.25)
    plan = plan_run(step_budget(1000), model, 135_000, CPU, torch.float32)  # about 15 epochs
    assert plan.model.dropout == 0.25  # given: it stays
    assert plan.model.weight_drop == sizing.AWD_RATES["weight_drop"]
    assert plan.model.embedding_dropout == sizing.AWD_RATES["embedding_dropout"]
    small = plan_run(step_budget(1000), replace(model, hidden_size=128, n_layers=1, dropout=None), 10**7, CPU, torch.float32)
    assert small.model.weight_drop == 0.0 and small.model.input_dropout == 0.0  # a model its corpus supports
    assert "weights per training character, so AWD-LSTM's regularisation" in plan.reason
    # The same rates given by hand to a model its corpus supports: the first line says whose they are.
    given = plan_run(
        step_budget(1000), replace(model, hidden_size=128, n_layers=1, **sizing.AWD_RATES), 10**7, CPU, torch.float32
    )
    assert "AWD-LSTM's regularisation as given: dropout 0.4" in given.reason and "so AWD" not in given.reason


def test_a_time_budget_that_would_reread_a_small_corpus_ends_after_its_epoch_cap(monkeypatch):
    monkeypatch.setattr(sizing, "measure_speed", lambda *args, **kwargs: 50_000.0)
    config = TrainConfig(data="x", max_time=3600.0, max_iters=0)
    plan = plan_run(config, ModelConfig(vocab_size=96), 135_000, CPU, torch.float32)
    cap = sizing.REGULARISED_MAX_EPOCHS if plan.model.weight_drop else sizing.MAX_EPOCHS
    assert plan.config.max_iters == cap * 135_000 // (32 * 64)
    assert f"the corpus read {cap} times" in plan.reason
    assert plan.config.eval_interval <= 135_000 // (32 * 64) + 1  # at least one evaluation an epoch


def test_auto_precision_trains_in_float32_where_the_probe_measured_bfloat16_slower(monkeypatch):
    speeds = {torch.float32: 40_000.0, torch.bfloat16: 30_000.0}
    monkeypatch.setattr(sizing, "measure_speed", lambda model, batch, seq, device, dtype, *rest: speeds[dtype])
    config = TrainConfig(data="x", max_time=60.0, max_iters=0, dtype="auto")
    plan = plan_run(config, ModelConfig(vocab_size=65), 10**6, CPU, torch.bfloat16)
    assert plan.dtype == torch.float32 and plan.chars_per_second == 40_000.0
    assert "in float32 (measured faster here than bfloat16: 40.0k chars/s against 30.0k chars/s)" in plan.reason
    speeds[torch.bfloat16] = 60_000.0
    plan = plan_run(config, ModelConfig(vocab_size=65), 10**6, CPU, torch.bfloat16)
    assert plan.dtype == torch.bfloat16 and "in bfloat16 (measured faster here than float32" in plan.reason
    given = plan_run(replace(config, dtype="bfloat16"), ModelConfig(vocab_size=65), 10**6, CPU, torch.bfloat16)
    assert given.dtype == torch.bfloat16  # a precision the user chose is kept, unmeasured

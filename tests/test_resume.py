"""Exact resume: N steps in one process equal k steps, then `--resume` to N in a new process.

Bit for bit on CPU: weights, optimizer moments, RNG and hidden state, learning rate,
step and stream position, the batches read and the train losses logged. The runs are
real `train.py` processes; a small wrapper only records which batches each one reads.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, TINY_TRAIN_FLAGS, CrashAt, run_python, tiny_model_config, tiny_train_config
from safetensors.torch import load_file

from charrnn.checkpoint import load_checkpoint
from charrnn.data.splits import split_tokens
from charrnn.data.streams import BatchStreams
from charrnn.errors import CheckpointError
from charrnn.tokenizer import CharTokenizer
from charrnn.training.callbacks import Callback, MetricsLog
from charrnn.training.trainer import train

N = 30  # total steps; the small corpus has 12 batches per epoch (checked below)
K_MID_EPOCH = 17  # epoch 1, batch 5
K_EPOCH_BOUNDARY = 12  # the last batch of epoch 0: the resumed run starts epoch 1

# train.py, with every batch the trainer reads appended (position and a digest) to a log file.
TRAIN_LOGGING_BATCHES = f"""
import hashlib, json, os, sys
sys.path.insert(0, {str(REPO)!r})
import charrnn.data.streams
real_get = charrnn.data.streams.BatchStreams.get
def get(self, pos):
    x, y = real_get(self, pos)
    digest = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()
    with open(os.environ["BATCH_LOG"], "a") as f:
        f.write(json.dumps([pos.epoch, pos.index, digest]) + "\\n")
    return x, y
charrnn.data.streams.BatchStreams.get = get
from charrnn.cli.train import main as train_main
raise SystemExit(train_main(sys.argv[1:]))
"""


def _flags(corpus, out):
    return [
        "--data",
        corpus,
        "--out",
        out,
        *TINY_TRAIN_FLAGS,
        "--dropout",
        "0.2",
        "--n-layers",
        "2",
        "--eval-interval",
        "10",
        "--lr",
        "1e-2",
        "--min-lr",
        "1e-3",
        "--warmup-iters",
        "5",
        "--lr-decay-iters",
        str(N),
    ]


def _train(tmp_path, env, batch_log, *args):
    proc = run_python(["-c", TRAIN_LOGGING_BATCHES, *args], {**env, "BATCH_LOG": str(batch_log)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def _last(run_dir):
    last = run_dir / "last"
    load_checkpoint(last, with_training_state=True)  # loadable as a whole, checksums included
    return (
        load_file(last / "model.safetensors"),
        load_file(last / "training_state.safetensors"),
        json.loads((last / "training_state.json").read_text(encoding="utf-8")),
    )


def _train_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in records if "loss" in r]


def _batches(log):
    return [tuple(json.loads(line)) for line in log.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, small_corpus_file, subprocess_env):
    """Run A: N steps in one process."""
    work = tmp_path_factory.mktemp("resume_straight")
    log = work / "batches.jsonl"
    _train(work, subprocess_env, log, *_flags(small_corpus_file, work / "run"), "--max-iters", N)
    return work / "run", log


def test_the_small_corpus_gives_the_epochs_this_file_assumes(small_corpus_file):
    text = small_corpus_file.read_text(encoding="utf-8")
    train_tokens, _ = split_tokens(CharTokenizer.from_text(text).encode(text))
    streams = BatchStreams(train_tokens, batch_size=4, seq_len=16, seed=1234)
    assert streams.batches_in_epoch(0) == K_EPOCH_BOUNDARY
    assert streams.batches_in_epoch(1) == 12 and N > 2 * 12  # N crosses two epoch boundaries


@pytest.mark.parametrize("k", [K_MID_EPOCH, K_EPOCH_BOUNDARY], ids=["mid-epoch", "epoch-boundary"])
def test_stopped_and_resumed_run_equals_straight_run_bit_for_bit(k, straight_run, small_corpus_file, subprocess_env, tmp_path):
    run_a, log_a = straight_run
    run_b, log_b = tmp_path / "run", tmp_path / "batches.jsonl"
    _train(tmp_path, subprocess_env, log_b, *_flags(small_corpus_file, run_b), "--max-iters", k)
    stopped = json.loads((run_b / "last" / "training_state.json").read_text(encoding="utf-8"))
    assert stopped["step"] == k
    if k == K_EPOCH_BOUNDARY:
        assert (stopped["epoch"], stopped["index"]) == (1, 0)
    else:
        assert stopped["index"] > 0  # really mid-epoch

    resumed = _train(tmp_path, subprocess_env, log_b, "--resume", run_b / "last", "--max-iters", N)
    assert "warning: resuming with max_iters=30" in resumed.stderr  # the changed budget is reported

    weights_a, tensors_a, state_a = _last(run_a)
    weights_b, tensors_b, state_b = _last(run_b)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), f"weights differ at {name}"
    # Optimizer moments and step counts, CPU RNG state, the hidden state of the streams.
    assert tensors_a.keys() == tensors_b.keys()
    assert any(k.startswith("optim.") for k in tensors_a) and "rng.cpu" in tensors_a and "hidden.0" in tensors_a
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), f"training state differs at {name}"
    for key in ("step", "epoch", "index", "param_groups", "hidden_parts"):
        assert state_a[key] == state_b[key], key
    assert state_a["step"] == N
    # The cosine schedule ran to its last step, 29 of 30 (lr 1e-2 -> 1e-3).
    assert state_a["param_groups"][0]["lr"] == pytest.approx(1e-3 + 0.5 * 9e-3 * (1 + math.cos(math.pi * 29 / 30)))

    assert _batches(log_b) == _batches(log_a)  # the same batches, in the same order, each read once
    losses_a = _train_losses(run_a)
    assert [step for step, _, _ in losses_a] == list(range(1, N + 1))
    assert _train_losses(run_b) == losses_a  # losses and learning rates, exactly


# --- resuming a run folder, and from a --save-every save -------------------------------------


def test_resume_given_the_run_folder_takes_its_last(tmp_path, corpus_file):
    """As sample.py takes a run folder's best, --resume takes its last (the one with training state)."""
    run = train(tiny_train_config(corpus_file, tmp_path / "run", max_iters=10), tiny_model_config())
    resumed = train(tiny_train_config(corpus_file, tmp_path / "run", max_iters=14, resume=str(run.run_dir)), tiny_model_config())
    assert resumed.step == 14
    assert load_checkpoint(tmp_path / "run").path.name == "best"  # sampling still takes best
    (tmp_path / "only_best").mkdir()
    (run.run_dir / "best").rename(tmp_path / "only_best" / "best")
    with pytest.raises(CheckpointError, match="holds no 'last' checkpoint to resume from, only 'best'"):
        load_checkpoint(tmp_path / "only_best", with_training_state=True)


def test_a_run_that_crashes_between_evaluations_resumes_from_its_save_every_save(tmp_path, corpus_file):
    """--save-every writes last between evaluations (here before every step); a run that crashed at
    step 9 of 12, with no evaluation since step 0, resumes from step 8 and ends as an unbroken run."""

    def config(out, **overrides):
        return tiny_train_config(corpus_file, out, max_iters=12, eval_interval=100, **overrides)

    straight = train(config(tmp_path / "a"), tiny_model_config(dropout=0.2), callbacks=[MetricsLog()])
    with pytest.raises(RuntimeError, match="injected"):
        train(config(tmp_path / "b", save_every=1e-9), tiny_model_config(dropout=0.2), callbacks=[MetricsLog(), CrashAt(9)])
    saved = json.loads((tmp_path / "b" / "last" / "training_state.json").read_text(encoding="utf-8"))
    assert saved["step"] == 8  # saved before step 9 began
    assert not (tmp_path / "b" / "best").exists()  # saves, not evaluations
    resumed = train(config(tmp_path / "b", resume=str(tmp_path / "b")), tiny_model_config(dropout=0.2), callbacks=[MetricsLog()])
    assert resumed.step == 12
    wa, wb = load_file(straight.last / "model.safetensors"), load_file(resumed.last / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _train_losses(resumed.run_dir) == _train_losses(straight.run_dir)


def test_a_restarted_worker_group_resumes_from_its_own_jobs_last_save(tmp_path, corpus_file, monkeypatch, capsys):
    """One process under torchrun's agent (the environment it sets): attempt 0 crashes after the save
    at step 5; attempt 1 of the same job resumes from it by itself and ends as an unbroken run. A
    `last` that another job left in the folder is not resumed from."""
    config = tiny_train_config(corpus_file, tmp_path / "run", max_iters=10, eval_interval=5, save_every=0)
    straight = train(tiny_train_config(corpus_file, tmp_path / "straight", max_iters=10, eval_interval=5), tiny_model_config())
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(RuntimeError, match="injected"):
        train(config, tiny_model_config(), callbacks=[MetricsLog(), CrashAt(7)])
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    messages = []

    class Notes(Callback):
        def on_message(self, trainer, text: str) -> None:
            messages.append(text)

    resumed = train(config, tiny_model_config(), callbacks=[MetricsLog(), Notes()])
    assert resumed.step == 10
    assert messages == [f"note: torchrun restart 1 of at most 2: resuming from {tmp_path / 'run' / 'last'}, the run's last save"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {"step": 5, "restart": 1, "resumed_from": str(tmp_path / "run" / "last")} in records
    assert _train_losses(resumed.run_dir) == _train_losses(straight.run_dir)
    wa, wb = load_file(straight.last / "model.safetensors"), load_file(resumed.last / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")  # another job, restarted, finds job 1's last
    messages.clear()
    again = train(config, tiny_model_config(), callbacks=[Notes()])
    assert messages == [
        f"note: torchrun restart 1 of at most 2: {tmp_path / 'run' / 'last'} was saved by another job, so training "
        "starts again from step 0"
    ]
    assert again.step == 10

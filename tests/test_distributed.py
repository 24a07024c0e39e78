"""Training under torchrun: 2 processes over gloo on this CPU, against one process."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from conftest import REPO, SAMPLE_SCRIPT, TINY_TRAIN_FLAGS, TRAIN_SCRIPT, run_python
from safetensors.torch import load_file

import charrnn

# Dropout off, so that two processes and one draw no different masks.
FLAGS = [*TINY_TRAIN_FLAGS, "--dropout", "0", "--eval-interval", "10", "--lr-decay-iters", "30"]


def torchrun(*args):
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _weights(run_dir):
    return load_file(run_dir / "last" / "model.safetensors")


def _assert_same_run(a, b, loss_tol=1e-4, weight_tol=1e-5):
    la, lb = _losses(a), _losses(b)
    assert la.keys() == lb.keys()
    assert max(abs(la[s] - lb[s]) for s in la) < loss_tol
    wa, wb = _weights(a), _weights(b)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < weight_tol


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, small_corpus_file, subprocess_env):
    """20 steps as 2 processes x batch 4 and as 1 process x batch 8; then the DDP run resumed on 1 process."""
    root = tmp_path_factory.mktemp("ddp")
    data = ["--data", small_corpus_file]
    two = run_python(
        torchrun(TRAIN_SCRIPT, *data, *FLAGS, "--max-iters", "20", "--out", root / "two"), subprocess_env, REPO, timeout=240
    )
    assert two.returncode == 0, two.stderr
    one = run_python(
        [TRAIN_SCRIPT, *data, *FLAGS, "--batch-size", "8", "--max-iters", "30", "--out", root / "one"], subprocess_env, REPO
    )
    assert one.returncode == 0, one.stderr
    return root, two


def test_two_processes_train_like_one_with_the_global_batch(ddp_runs):
    root, two = ddp_runs
    assert "2 processes" in two.stderr
    losses = _losses(root / "two")
    assert sorted(losses) == list(range(1, 21))  # rank 0 alone logs, once per step
    one = _losses(root / "one")
    assert max(abs(losses[s] - one[s]) for s in losses) < 1e-4


def test_a_checkpoint_from_two_processes_resumes_on_one_and_samples(ddp_runs, small_corpus_file, subprocess_env, tmp_path):
    root, _ = ddp_runs
    resumed = run_python(
        [
            TRAIN_SCRIPT,
            "--resume",
            root / "two" / "last",
            "--batch-size",
            "8",
            "--max-iters",
            "30",
            "--out",
            tmp_path / "resumed",
            "--no-plot",
        ],
        subprocess_env,
        REPO,
    )
    assert resumed.returncode == 0, resumed.stderr
    # 2 x 4 rows are the same layout as 1 x 8: the resumed run continues exactly.
    (tmp_path / "resumed" / "metrics.jsonl").write_text(
        (root / "two" / "metrics.jsonl").read_text() + (tmp_path / "resumed" / "metrics.jsonl").read_text()
    )
    _assert_same_run(tmp_path / "resumed", root / "one")
    sample = run_python(
        [SAMPLE_SCRIPT, "--checkpoint", root / "two", "--prompt", "ab", "--length", "20", "--seed", "1"], subprocess_env, REPO
    )
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("ab") and len(sample.stdout.rstrip("\n")) == 22


def test_ddp_saved_weights_match_one_process(ddp_runs, small_corpus_file, subprocess_env, tmp_path):
    root, _ = ddp_runs
    one = run_python(
        [
            TRAIN_SCRIPT,
            "--data",
            small_corpus_file,
            *FLAGS,
            "--batch-size",
            "8",
            "--max-iters",
            "20",
            "--out",
            tmp_path / "one20",
        ],
        subprocess_env,
        REPO,
    )
    assert one.returncode == 0, one.stderr
    _assert_same_run(root / "two", tmp_path / "one20")
    ckpt = charrnn.load(root / "two" / "last", device="cpu")
    assert all(torch.isfinite(p).all() for p in ckpt.model.parameters())


def test_a_failing_rank_ends_the_job_with_its_message(small_corpus_file, subprocess_env, tmp_path):
    """Rank 1 fails at step 3; the job must end (no deadlock) and show why."""
    script = tmp_path / "failing_rank.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from charrnn.errors import TrainingError
        from charrnn.training.trainer import Trainer
        original = Trainer.train_step
        def train_step(self):
            if os.environ["RANK"] == "1" and self.step == 3:
                raise TrainingError("rank 1 cannot go on (injected by the test)")
            return original(self)
        Trainer.train_step = train_step
        from charrnn.cli.train import main as train_main
        raise SystemExit(train_main())
    """)
    )
    env = dict(subprocess_env, TORCHELASTIC_ERROR_FILE=str(tmp_path / "error.json"))
    failed = run_python(
        torchrun(script, "--data", small_corpus_file, *FLAGS, "--max-iters", "20", "--out", tmp_path / "run"),
        env,
        REPO,
        timeout=180,
    )
    assert failed.returncode != 0
    assert "rank 1 cannot go on (injected by the test)" in failed.stderr
    assert os.path.exists(tmp_path / "run")  # rank 0 had started the run before the failure

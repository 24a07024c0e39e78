"""Training under torchrun: 2 processes over gloo on this CPU, against one process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import textwrap

import pytest
import torch
from conftest import PYTHON, REPO, SAMPLE_SCRIPT, TINY_TRAIN_FLAGS, TRAIN_SCRIPT, run_python
from safetensors.torch import load_file

import charrnn

# Dropout off, so that two processes and one draw no different masks.
FLAGS = [
    *TINY_TRAIN_FLAGS,
    "--dropout",
    "0",
    "--input-dropout",
    "0",
    "--embedding-dropout",
    "0",
    "--weight-drop",
    "0",
    "--eval-interval",
    "10",
    "--lr-decay-iters",
    "30",
]


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


def test_nothing_of_ddp_outlives_the_process_group(small_corpus_file, subprocess_env, tmp_path):
    """The DDP wrapper holds the gloo backend: left alive past destroy_process_group (a reference cycle of
    the trainer did that), its threads were torn down at interpreter exit and aborted a rank (SIGABRT)."""
    script = tmp_path / "alive.py"
    script.write_text(
        textwrap.dedent(f"""
        import gc, os, sys
        sys.path.insert(0, {str(REPO)!r})
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
        from charrnn.cli.train import main as train_main
        assert train_main() == 0
        alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())  # no collection first
        print(f"rank {{os.environ['RANK']}}: group destroyed {{not dist.is_initialized()}}, DDP wrappers alive {{alive}}")
    """)
    )
    job = run_python(
        torchrun(script, "--data", small_corpus_file, *FLAGS, "--max-iters", "10", "--out", tmp_path / "run"),
        subprocess_env,
        REPO,
        timeout=180,
    )
    assert job.returncode == 0, job.stderr
    # Both ranks print to one pipe, so their lines may interleave: each report is found on its own.
    reports = re.findall(r"rank (\d): group destroyed (\w+), DDP wrappers alive (\d+)", job.stdout)
    assert sorted(reports) == [("0", "True", "0"), ("1", "True", "0")], job.stdout


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


# --- elastic restarts: torchrun --max-restarts, a worker SIGKILLed mid-run --------------------------

# train.py with a fault injected on the first attempt only (TORCHELASTIC_RESTART_COUNT 0); every
# process appends "attempt rank" to $ATTEMPTS when it starts.
FAULTY_TRAIN = f"""
import os, signal, sys, time
sys.path.insert(0, {str(REPO)!r})
with open(os.environ["ATTEMPTS"], "a") as f:
    f.write(os.environ["TORCHELASTIC_RESTART_COUNT"] + " " + os.environ["RANK"] + "\\n")
from charrnn.training.trainer import Trainer
original = Trainer.train_step
def train_step(self):
    loss = original(self)
    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and self.step == 15:
        if os.environ["RANK"] == "1":
            if os.environ.get("REMOVE_CORPUS"):
                os.remove(self.config.data)
            os.kill(os.getpid(), signal.SIGKILL)  # mid-epoch, 5 steps after the save at step 10
        time.sleep(2)  # rank 0: outside any collective when torchrun's SIGTERM comes
    return loss
Trainer.train_step = train_step
from charrnn.cli.train import main
raise SystemExit(main())
"""


def _attempts(path):
    return sorted(tuple(map(int, line.split())) for line in path.read_text().splitlines())


def test_a_killed_worker_restarts_the_job_from_its_last_save_bit_for_bit(ddp_runs, small_corpus_file, subprocess_env, tmp_path):
    """Rank 1 is SIGKILLed after step 15; torchrun SIGTERMs rank 0 and restarts both, which resume from
    the save at step 10 by themselves and end at step 20 exactly as the unbroken 2-process run did."""
    root, _ = ddp_runs
    script = tmp_path / "faulty_train.py"
    script.write_text(FAULTY_TRAIN)
    env = dict(subprocess_env, ATTEMPTS=str(tmp_path / "attempts"))
    run_dir = tmp_path / "run"
    args = ["--data", small_corpus_file, *FLAGS, "--max-iters", "20", "--out", run_dir]
    job = run_python(torchrun("--max-restarts", "2", script, *args), env, REPO, timeout=240)
    assert job.returncode == 0, job.stderr
    assert _attempts(tmp_path / "attempts") == [(0, 0), (0, 1), (1, 0), (1, 1)]  # one restart
    # The survivor's SIGTERM path met the dead peer and ended cleanly: a sentence, no traceback.
    assert "[rank0]: Traceback" not in job.stderr and "Traceback" not in job.stderr
    assert "error: another process of the job stopped while agreeing to stop" in job.stderr
    assert f"note: torchrun restart 1 of at most 2: resuming from {run_dir / 'last'}" in job.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 10, "restart": 1, "resumed_from": str(run_dir / "last")} in records
    # Steps 11-15 of the first attempt were dropped from the log and done again, identically.
    assert _losses(run_dir) == _losses(root / "two")
    for name in ("model.safetensors", "training_state.safetensors"):
        a, b = load_file(run_dir / "last" / name), load_file(root / "two" / "last" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_an_error_every_restart_meets_ends_the_job_with_its_message(small_corpus_file, subprocess_env, tmp_path):
    """The corpus is removed mid-run and a worker dies: the restart cannot read the corpus, and ends
    the job with that message instead of restarting it twice more."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(small_corpus_file.read_text())
    script = tmp_path / "faulty_train.py"
    script.write_text(FAULTY_TRAIN)
    env = dict(subprocess_env, ATTEMPTS=str(tmp_path / "attempts"), REMOVE_CORPUS="1")
    args = ["--data", corpus, *FLAGS, "--max-iters", "20", "--out", tmp_path / "run"]
    job = run_python(torchrun("--max-restarts", "3", script, *args), env, REPO, timeout=240)
    assert job.returncode != 0
    assert f"error: corpus {str(corpus)!r} not found" in job.stderr
    assert "ended the torchrun job instead of restarting it" in job.stderr
    assert max(attempt for attempt, _ in _attempts(tmp_path / "attempts")) == 1  # not 3


# --- several nodes: two torchrun agents and a c10d rendezvous on 127.0.0.1 ---------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_train_like_one_node_of_two(ddp_runs, small_corpus_file, subprocess_env, tmp_path):
    """The two-machine command of docs/big-corpora.md, both "machines" on this one: the same losses as
    --nproc_per_node 2 (and the same weights: the same arithmetic in the same order)."""
    root, _ = ddp_runs
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "two-nodes"]
    args = ["--data", small_corpus_file, *FLAGS, "--max-iters", "20", "--out", tmp_path / "run"]
    nodes = [
        subprocess.Popen(
            [PYTHON, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1"]
            + [*rendezvous, TRAIN_SCRIPT, *map(str, args)],
            cwd=REPO,
            env=subprocess_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        errors = [node.communicate(timeout=240)[1] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], errors
    assert any("2 processes" in e for e in errors)
    one_node, two_nodes = _losses(root / "two"), _losses(tmp_path / "run")
    assert one_node.keys() == two_nodes.keys() == set(range(1, 21))
    assert max(abs(one_node[s] - two_nodes[s]) for s in one_node) < 1e-6


def test_processes_that_find_different_saves_stop_with_a_sentence(ddp_runs, subprocess_env, tmp_path):
    """What a run folder on one machine's disk only leads to: the processes compare the save they
    resume from before training, and stop, naming the storage, instead of training on from two places."""
    root, _ = ddp_runs
    script = tmp_path / "other_save_on_rank1.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        if os.environ["RANK"] == "1":  # this "machine" sees another copy of the run folder
            sys.argv[sys.argv.index("--resume") + 1] = {str(root / "one" / "last")!r}
        from charrnn.cli.train import main
        raise SystemExit(main())
    """)
    )
    args = ["--resume", root / "two" / "last", "--batch-size", "4", "--max-iters", "40", "--out", tmp_path / "run", "--no-plot"]
    job = run_python(torchrun(script, *args), subprocess_env, REPO, timeout=180)
    assert job.returncode != 0
    assert "error: the processes found different saves to resume from (rank 0: step 20, rank 1: step 30)" in job.stderr
    assert "Traceback" not in job.stderr.split("error: the processes found")[0]

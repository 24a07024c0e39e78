"""Shared fixtures: tiny corpora, an isolated corpus cache, one tiny trained model.

Everything here is small on purpose (the machine has 2 cores and is busy): corpora of
a few KB generated in tmp dirs, models 16-32 wide, a few hundred training steps at
most. Nothing touches the network or the repository's data/ and checkpoints/.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import charrnn
from charrnn.config import ModelConfig, TrainConfig
from charrnn.training.callbacks import Callback
from charrnn.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE_CANDIDATES = (
    Path("/work/shared/data/tinyshakespeare/input.txt"),
    REPO / "data" / "shakespeare" / "input.txt",
)

# Tiny models run faster on one thread, and the other core is busy training.
torch.set_num_threads(1)

_WORDS = (
    "the a cat dog bird sat ran flew on in under over mat house garden tree and but then "
    "quickly slowly red blue big small old young king queen said sing"
).split()
_NAMES = ("ROMEO", "JULIET", "KING")


def make_text(seed: int, n_chars: int) -> str:
    """Pseudo-English dialogue (letters, spaces, '.', ':', newlines; no digits) of about n_chars."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        line = f"{rng.choice(_NAMES)}:\n" + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 9))) + ".\n\n"
        parts.append(line)
        size += len(line)
    return "".join(parts)[:n_chars]


def tiny_train_config(data: str | Path, out: str | Path, **overrides) -> TrainConfig:
    """A TrainConfig for library tests: cpu, float32, no progress bar or samples, step budget."""
    values = dict(
        data=data if isinstance(data, tuple) else str(data),
        out=str(out),
        max_iters=20,
        max_time=0,
        eval_interval=10,
        batch_size=8,
        seq_len=16,
        lr=1e-2,
        min_lr=1e-3,
        warmup_iters=5,
        progress=False,
        sample_chars=0,
        plot=False,
        device="cpu",
        dtype="float32",
        seed=1234,
    )
    values.update(overrides)
    return TrainConfig(**values)


def tiny_model_config(**overrides) -> ModelConfig:
    values = dict(cell="lstm", n_layers=2, hidden_size=32, embedding_size=16, dropout=0.0)
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test may use the network or the repository's corpus cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("CHARRNN_DATA_DIR", str(tmp_path / "isolated_data"))
    monkeypatch.setenv("CHARRNN_SHAKESPEARE_URL", "file:///nonexistent/charrnn-tests/no-network.txt")


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """An empty corpus cache; CHARRNN_DATA_DIR points at it."""
    path = tmp_path / "data"
    path.mkdir()
    monkeypatch.setenv("CHARRNN_DATA_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def shakespeare_source() -> Path:
    """The shared copy of Tiny Shakespeare (read only; tests copy it into tmp dirs)."""
    for path in SHAKESPEARE_CANDIDATES:
        if path.is_file():
            return path
    pytest.fail(f"Tiny Shakespeare not found at any of {[str(p) for p in SHAKESPEARE_CANDIDATES]}")


@pytest.fixture
def shakespeare_data_dir(data_dir, shakespeare_source) -> Path:
    """A corpus cache holding a correct copy of Tiny Shakespeare."""
    dest = data_dir / "shakespeare" / "input.txt"
    dest.parent.mkdir(parents=True)
    shutil.copyfile(shakespeare_source, dest)
    return data_dir


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return make_text(seed=0, n_chars=8000)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus_text) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus_file):
    """A 2-layer 32-wide LSTM trained for 600 steps on the tiny corpus (made once per session, ~2 s)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    config = tiny_train_config(corpus_file, out, max_iters=600, eval_interval=300, batch_size=16, seq_len=32)
    return train(config, tiny_model_config())


@pytest.fixture(scope="session")
def sampler(trained_run) -> charrnn.Sampler:
    """float32 throughout, so stepped states can be compared with a forward pass."""
    return charrnn.load(trained_run.best, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def subprocess_env(tmp_path_factory) -> dict[str, str]:
    """Environment for running train.py / sample.py as subprocesses, offline and isolated."""
    root = tmp_path_factory.mktemp("subprocess_env")
    env = dict(os.environ)
    env.update(
        CHARRNN_DATA_DIR=str(root / "data"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(root / "hf_home"),
        HF_DATASETS_CACHE=str(root / "hf_cache"),
        PYTHONIOENCODING="utf-8",
        OMP_NUM_THREADS="1",
    )
    env.pop("CHARRNN_SHAKESPEARE_URL", None)
    return env


PYTHON = sys.executable


# --- running train.py / sample.py as real processes ----------------------------------------

TRAIN_SCRIPT = str(REPO / "train.py")
SAMPLE_SCRIPT = str(REPO / "sample.py")
# Tiny model and budget flags for train.py subprocesses: cpu, float32, step budget only.
TINY_TRAIN_FLAGS = (
    "--hidden-size",
    "32",
    "--embedding-size",
    "8",
    "--batch-size",
    "4",
    "--seq-len",
    "16",
    "--max-time",
    "0",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--sample-chars",
    "0",
    "--patience",
    "0",
    "--no-plot",
    "--seed",
    "1234",
)


def run_python(args, env, cwd, timeout=120, stdin=None):
    """Run ``python *args`` to completion (killed after ``timeout`` s, which fails the test)."""
    return subprocess.run(
        [PYTHON, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
        stdin=subprocess.DEVNULL if stdin is None else stdin,
    )


def wait_for(condition, proc=None, timeout=60.0, what="a condition"):
    """Poll ``condition()`` until true; fail if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def metrics_lines(run_dir) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return path.read_text(encoding="utf-8").count("\n") if path.exists() else 0


@pytest.fixture(scope="session")
def small_corpus_file(tmp_path_factory) -> Path:
    """About 900 characters: with batch 4 x seq 16, an epoch is 12 steps (a handful)."""
    path = tmp_path_factory.mktemp("small_corpus") / "small.txt"
    path.write_text(make_text(seed=1, n_chars=900), encoding="utf-8")
    return path


class CrashAt(Callback):
    """Raises after step ``step``, as a crash between two evaluations would end the run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, trainer, loss: float) -> None:
        if trainer.step == self.step:
            raise RuntimeError("crash (injected by the test)")

"""Safety: crashes mid-save, signals, NaN, a full disk, damaged checkpoints, pickles.

Where the promise is about a process, a file or a signal, the test uses a real one:
train.py runs as a subprocess and is killed with SIGKILL or interrupted with
SIGINT/SIGTERM. A small wrapper around train.py can hold a save at a chosen instant
(by sleeping there), so that the kill lands exactly where the test wants it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    PYTHON,
    REPO,
    SAMPLE_SCRIPT,
    TINY_TRAIN_FLAGS,
    TRAIN_SCRIPT,
    make_text,
    metrics_lines,
    run_python,
    tiny_model_config,
    tiny_train_config,
    wait_for,
)

import charrnn
import charrnn.checkpoint as ckpt_module
import charrnn.training.callbacks as callbacks_module
from charrnn.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from charrnn.cli.sample import main as sample_main
from charrnn.config import TrainConfig
from charrnn.errors import CheckpointError, TrainingError
from charrnn.model import CharRNN
from charrnn.tokenizer import CharTokenizer
from charrnn.training.trainer import Trainer

# train.py, except that one save can be held (the process sleeps) at a chosen instant:
#   PAUSE_MOMENT=write            half-way through writing model.safetensors into .last.tmp-PID
#   PAUSE_MOMENT=between-renames  after `last` became `.last.old`, before the new copy is renamed in
#   PAUSE_MOMENT=after-swap       after the new `last` is in place, before `.last.old` is removed
#   PAUSE_MOMENT=slow-last        at the start of writing `last` (then the save goes on normally)
# PAUSE_SAVE picks which save of `last` (1, 2, ...) in this process; PAUSE_MARKER is touched on arrival;
# the process then waits PAUSE_SECONDS (default 120), or until the file PAUSE_RELEASE appears.
PAUSING_TRAIN = f"""
import os, sys, time
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
import charrnn.checkpoint as ck
moment, when, marker = os.environ["PAUSE_MOMENT"], int(os.environ["PAUSE_SAVE"]), Path(os.environ["PAUSE_MARKER"])
hold = float(os.environ.get("PAUSE_SECONDS", "120"))
saves = 0
real_write, real_rename = ck.write_file, os.rename

def pause():
    marker.touch()
    release = os.environ.get("PAUSE_RELEASE")
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline and not (release and os.path.exists(release)):
        time.sleep(0.01)

def write(path, data):
    global saves
    path = Path(path)
    if path.parent.name.startswith(".last.tmp-") and path.name == ck.WEIGHTS_FILE:
        saves += 1
        if saves == when and moment == "write":
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            pause()
        if saves == when and moment == "slow-last":
            pause()
    return real_write(path, data)

def rename(src, dst):
    real_rename(src, dst)
    src, dst = Path(src), Path(dst)
    if saves == when and (
        (moment == "between-renames" and src.name == "last" and dst.name == ".last.old")
        or (moment == "after-swap" and src.name.startswith(".last.tmp-") and dst.name == "last")
    ):
        pause()

ck.write_file = write
os.rename = rename
from charrnn.cli.train import main as train_main
raise SystemExit(train_main(sys.argv[1:]))
"""


def _popen(args, env, cwd):
    return subprocess.Popen(
        [PYTHON, *map(str, args)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
    )


def _finish(proc, timeout=60):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"process did not exit within {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    code, _, _ = _finish(proc)
    assert code == -signal.SIGKILL


def _train_flags(corpus, run, *extra):
    return ["--data", corpus, "--out", run, *TINY_TRAIN_FLAGS, *extra]


def _assert_loadable_last(run: Path, step: int | None = None):
    """run/last (or its intact previous copy) loads with its training state; a half-written copy never does."""
    ckpt = load_checkpoint(run / "last", with_training_state=True)
    assert ".tmp-" not in ckpt.path.name
    assert ".tmp-" not in resolve_checkpoint(run).name  # what sample.py picks from the run dir
    assert all(torch.isfinite(p).all() for p in ckpt.model.parameters())
    if step is not None:
        assert ckpt.state["step"] == ckpt.meta["step"] == step
    return ckpt


def _train_steps(run: Path) -> list[int]:
    return [
        json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if '"loss"' in line
    ]


# --- 2. crash-safe saving ----------------------------------------------------------------------


def test_sigkill_at_every_instant_of_a_save_leaves_the_last_checkpoint_loadable(tmp_path, small_corpus_file, subprocess_env):
    run = tmp_path / "run"
    marker = tmp_path / "paused"
    first = _train_flags(small_corpus_file, run, "--eval-interval", "1", "--max-iters", "1000")
    resume = ["--resume", run / "last"]
    # (where the save is held, which save of this process, arguments, step of the checkpoint that must load)
    cycles = [
        ("write", 3, first, 2),  # new run saves at steps 1, 2, then dies writing step 3's weights
        ("between-renames", 3, resume, 4),  # resumes from 2, saves 3, 4, dies as 5 swaps in: 4 is at .last.old
        ("after-swap", 2, resume, 6),  # resumes from 4 (found at .last.old), saves 5, dies right after 6 is in place
    ]
    for moment, when, args, step in cycles:
        marker.unlink(missing_ok=True)
        env = {**subprocess_env, "PAUSE_MOMENT": moment, "PAUSE_SAVE": str(when), "PAUSE_MARKER": str(marker)}
        proc = _popen(["-c", PAUSING_TRAIN, *args], env, tmp_path)
        wait_for(marker.exists, proc, what=f"the save to reach {moment}")
        _kill(proc)
        if moment == "write":
            (partial,) = run.glob(".last.tmp-*")  # the half-written copy is there...
            assert (partial / "model.safetensors").exists() and not (partial / "config.json").exists()
        if moment == "between-renames":
            assert not (run / "last").exists() and (run / ".last.old").is_dir()
        _assert_loadable_last(run, step)  # ...and never picked up

    # The same with the real train.py, killed at arbitrary instants while it saves at every step.
    for delay in (0.0, 0.017):
        before = metrics_lines(run)
        proc = _popen([TRAIN_SCRIPT, *resume], subprocess_env, tmp_path)
        wait_for(lambda before=before: metrics_lines(run) >= before + 6, proc, what="three more steps")
        time.sleep(delay)
        _kill(proc)
        _assert_loadable_last(run)

    # A resume after all those crashes runs to the end and leaves nothing behind.
    done = run_python([TRAIN_SCRIPT, *resume, "--max-iters", "40"], subprocess_env, tmp_path)
    assert done.returncode == 0, done.stderr
    _assert_loadable_last(run, 40)
    assert sorted(p.name for p in run.iterdir()) == ["best", "last", "metrics.jsonl"]
    assert _train_steps(run) == list(range(1, 41))  # every step logged exactly once, cut-off lines dropped
    assert charrnn.load(run, device="cpu").generate("a", length=5, seed=0)


def _tiny_checkpoint_parts(seed=0, text=None, hidden_size=16):
    text = text or make_text(seed=seed, n_chars=400)
    tok = CharTokenizer.from_text(text)
    torch.manual_seed(seed)
    model = CharRNN(tiny_model_config(vocab_size=tok.vocab_size, hidden_size=hidden_size, n_layers=1))
    state_tensors = {"rng.cpu": torch.get_rng_state(), "optim.0.exp_avg": torch.randn(3, 4)}
    return model, tok, state_tensors, {"step": seed, "epoch": 0, "index": seed}


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def saved_last(tmp_path):
    """A run directory holding one good `last` checkpoint (step 1), and its bytes."""
    model, tok, tensors, state = _tiny_checkpoint_parts(seed=1)
    path = save_checkpoint(tmp_path / "run" / "last", model, tok, {"step": 1}, tensors, state)
    return path, _snapshot(path.parent)


def _assert_untouched(saved_last):
    path, before = saved_last
    assert _snapshot(path.parent) == before  # same files, same bytes: no tmp or .old folder left
    assert load_checkpoint(path, with_training_state=True).state["step"] == 1


@pytest.mark.parametrize("exception", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
@pytest.mark.parametrize("where", ["writing-tokenizer", "second-rename"])
def test_an_exception_in_the_middle_of_a_save_leaves_no_partial_files(saved_last, monkeypatch, exception, where):
    model, tok, tensors, state = _tiny_checkpoint_parts(seed=2)
    if where == "writing-tokenizer":
        real_write = ckpt_module.write_file

        def write(path, data):
            if path.name == "tokenizer.json":
                path.write_bytes(data[:10])
                raise exception
            return real_write(path, data)

        monkeypatch.setattr(ckpt_module, "write_file", write)
    else:  # the old copy has been moved aside, the new one is about to be renamed in
        real_rename = os.rename

        def rename(src, dst):
            if Path(src).name.startswith(".last.tmp-"):
                raise exception
            return real_rename(src, dst)

        monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(type(exception)):
        save_checkpoint(saved_last[0], model, tok, {"step": 2}, tensors, state)
    monkeypatch.undo()
    _assert_untouched(saved_last)


# --- 5. a full disk ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), OSError(errno.ENOSPC)],
    ids=["from-the-os", "bare-errno"],
)
def test_a_full_disk_gives_a_checkpoint_error_and_keeps_the_last_good_checkpoint(saved_last, monkeypatch, error):
    model, tok, tensors, state = _tiny_checkpoint_parts(seed=2)
    real_write = ckpt_module.write_file
    written = []

    def write(path, data):
        if written:  # the weights fit; the disk fills up during the next file
            with open(path, "wb") as f:
                f.write(data[: len(data) // 3])
            raise error
        written.append(path)
        return real_write(path, data)

    monkeypatch.setattr(ckpt_module, "write_file", write)
    with pytest.raises(
        CheckpointError, match=r"could not write checkpoint .*last: the disk is full .*previous checkpoint is unchanged"
    ):
        save_checkpoint(saved_last[0], model, tok, {"step": 2}, tensors, state)
    monkeypatch.undo()
    _assert_untouched(saved_last)


def test_a_full_disk_during_training_stops_with_a_clear_error_and_a_loadable_checkpoint(corpus_file, tmp_path, monkeypatch):
    trainer = Trainer(tiny_train_config(corpus_file, tmp_path / "run", max_iters=12, eval_interval=4), tiny_model_config())
    real_write = ckpt_module.write_file

    def write(path, data):
        if trainer.step >= 8:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, data)

    monkeypatch.setattr(ckpt_module, "write_file", write)
    with pytest.raises(CheckpointError, match="disk is full"):
        trainer.run()
    monkeypatch.undo()
    _assert_loadable_last(tmp_path / "run", 4)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best", "last", "metrics.jsonl"]

    # The metrics log is a write too: a full disk there is a TrainingError, not a traceback.
    def full_disk_open(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    resumed = Trainer(tiny_train_config(corpus_file, tmp_path / "run", resume=str(tmp_path / "run" / "last")))
    monkeypatch.setattr(callbacks_module, "open_append", full_disk_open)  # the metrics log's writes
    with pytest.raises(TrainingError, match=r"could not write .*metrics.jsonl: No space left on device"):
        resumed.run()


# --- 3. signals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_resumable_checkpoint_says_where_and_exits_128_plus_signal(
    signum, tmp_path, small_corpus_file, subprocess_env, corpus_file
):
    run = tmp_path / "run"
    proc = _popen(
        [TRAIN_SCRIPT, *_train_flags(small_corpus_file, run, "--max-iters", "100000", "--eval-interval", "100000")],
        subprocess_env,
        tmp_path,
    )
    wait_for(lambda: metrics_lines(run) >= 3, proc, what="training to start")
    proc.send_signal(signum)
    code, _, err = _finish(proc)
    name = signal.Signals(signum).name
    assert code == 128 + signum  # 130 for SIGINT, 143 for SIGTERM
    assert "Traceback" not in err
    assert f"{name}: stopping after this step and saving a checkpoint" in err
    assert f"stopped by {name}" in err
    assert f"{run / 'last'} (last, resumable)" in err
    steps = _train_steps(run)
    ckpt = _assert_loadable_last(run, steps[-1])
    assert steps == list(range(1, ckpt.state["step"] + 1))

    # Resumable: a new run picks up at that step and goes on.
    resumed = Trainer(
        TrainConfig(
            data=str(small_corpus_file),
            resume=str(run / "last"),
            max_iters=ckpt.state["step"] + 2,
            max_time=0,
            device="cpu",
            dtype="float32",
            sample_chars=0,
            progress=False,
            plot=False,
        )
    )
    assert resumed.step == ckpt.state["step"]
    assert resumed.run().step == ckpt.state["step"] + 2


def test_more_signals_during_the_final_save_do_not_corrupt_it(tmp_path, small_corpus_file, subprocess_env):
    run = tmp_path / "run"
    marker = tmp_path / "saving"
    release = tmp_path / "release"
    # The only save of `last` is the one after the first signal; it is held until the test
    # releases it, so that the next signals land in the middle of it.
    env = {
        **subprocess_env,
        "PAUSE_MOMENT": "slow-last",
        "PAUSE_SAVE": "1",
        "PAUSE_MARKER": str(marker),
        "PAUSE_SECONDS": "60",
        "PAUSE_RELEASE": str(release),
    }
    args = _train_flags(small_corpus_file, run, "--max-iters", "100000", "--eval-interval", "100000")
    proc = _popen(["-c", PAUSING_TRAIN, *args], env, tmp_path)
    wait_for(lambda: metrics_lines(run) >= 3, proc, what="training to start")
    proc.send_signal(signal.SIGINT)
    wait_for(marker.exists, proc, what="the final save to start")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    release.touch()
    code, _, err = _finish(proc)
    assert code == 130, err  # the first signal decides
    assert "Traceback" not in err
    assert "SIGTERM again: ignored, so that the checkpoint save completes" in err
    steps = _train_steps(run)
    _assert_loadable_last(run, steps[-1])
    assert not list(run.glob(".last*"))


# --- 4. a non-finite loss ------------------------------------------------------------------------


def _poison(trainer, at_step, how):
    """Make the model's forward pass go bad at training step ``at_step`` (1-based)."""
    real_forward = trainer.model.forward

    def forward(idx, hidden=None):
        logits, hidden = real_forward(idx, hidden)
        if trainer.model.training and trainer.step + 1 == at_step:
            if how == "nan-loss":
                logits = logits * float("nan")
            else:  # a finite loss whose gradient is NaN: 0 * sqrt(0) has the value 0 and the slope NaN
                w = trainer.model.head.weight
                logits = logits + 0 * torch.sqrt(w - w).sum()
        return logits, hidden

    trainer.model.forward = forward


@pytest.mark.parametrize(
    ("how", "grad_clip", "message"),
    [
        ("nan-loss", 1.0, "the loss became nan at step 7"),
        ("nan-gradient", 1.0, "the gradient became non-finite at step 7"),
        ("nan-gradient", 0.0, "the gradient became non-finite at step 7"),  # even with clipping off
    ],
)
def test_a_non_finite_loss_stops_the_run_naming_the_step(corpus_file, tmp_path, how, grad_clip, message):
    run = tmp_path / "run"
    trainer = Trainer(
        tiny_train_config(corpus_file, run, max_iters=20, eval_interval=3, grad_clip=grad_clip), tiny_model_config()
    )
    _poison(trainer, at_step=7, how=how)
    with pytest.raises(TrainingError, match=message):
        trainer.run()
    assert trainer.step == 6
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the bad step never touched them
    _assert_loadable_last(run, 6)
    for name in ("best", "last"):
        assert all(torch.isfinite(p).all() for p in load_checkpoint(run / name).model.parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_save_checkpoint_refuses_non_finite_weights(saved_last, bad):
    model, tok, tensors, state = _tiny_checkpoint_parts(seed=2)
    with torch.no_grad():
        model.head.bias[3] = bad
    with pytest.raises(CheckpointError, match=r"refusing to save non-finite weights \(head.bias\)"):
        save_checkpoint(saved_last[0], model, tok, {"step": 2}, tensors, state)
    _assert_untouched(saved_last)


# --- 6. damaged checkpoints --------------------------------------------------------------------


@pytest.fixture
def good_last(trained_run, tmp_path) -> Path:
    """A private copy of a trained run's `last` checkpoint (with training state)."""
    return Path(shutil.copytree(trained_run.last, tmp_path / "run" / "last"))


def _rehash(ckpt_dir: Path, name: str) -> None:
    """Record ``name``'s current sha256 in config.json: damage the checksum cannot see."""
    config = json.loads((ckpt_dir / "config.json").read_text(encoding="utf-8"))
    config["files"][name] = hashlib.sha256((ckpt_dir / name).read_bytes()).hexdigest()
    (ckpt_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")


def _other_vocabulary_checkpoint(tmp_path) -> Path:
    """A checkpoint of the same shape trained on another alphabet (digits and symbols)."""
    text = "".join(np.random.default_rng(0).choice(list("0123456789+-*/=() \n"), 600))
    tok = CharTokenizer.from_text(text)
    model = CharRNN(tiny_model_config(vocab_size=tok.vocab_size))
    return save_checkpoint(tmp_path / "other" / "best", model, tok, {"step": 1})


def _damage(ckpt: Path, how: str, tmp_path: Path) -> str:
    """Damage the checkpoint; return the file the error must name."""
    rng = np.random.default_rng(abs(hash(how)) % 2**32)
    weights = ckpt / "model.safetensors"
    if how == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "bit-flipped-weights":
        data = bytearray(weights.read_bytes())
        data[len(data) * 2 // 3] ^= 0x10
        weights.write_bytes(bytes(data))
    elif how == "truncated-weights-rehashed":  # the checksum agrees, the file still cannot be read
        weights.write_bytes(weights.read_bytes()[:1000])
        _rehash(ckpt, "model.safetensors")
    elif how == "header-bit-flipped-rehashed":
        data = bytearray(weights.read_bytes())
        data[20] ^= 0x01  # inside the JSON header
        weights.write_bytes(bytes(data))
        _rehash(ckpt, "model.safetensors")
    elif how == "missing-tokenizer":
        (ckpt / "tokenizer.json").unlink()
        return "tokenizer.json"
    elif how == "missing-weights":
        weights.unlink()
    elif how == "missing-config":
        (ckpt / "config.json").unlink()
        return "config.json"
    elif how == "other-vocabulary-config-and-tokenizer":
        other = _other_vocabulary_checkpoint(tmp_path)
        for name in ("config.json", "tokenizer.json"):
            shutil.copyfile(other / name, ckpt / name)
    elif how == "other-vocabulary-tokenizer-rehashed":
        shutil.copyfile(_other_vocabulary_checkpoint(tmp_path) / "tokenizer.json", ckpt / "tokenizer.json")
        _rehash(ckpt, "tokenizer.json")
        return "tokenizer.json"
    elif how == "config-vocab-size-edited":
        config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        config["model"]["vocab_size"] += 7
        (ckpt / "config.json").write_text(json.dumps(config), encoding="utf-8")
        return "tokenizer.json"
    elif how == "config-hidden-size-edited":
        config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        config["model"]["hidden_size"] = 48
        (ckpt / "config.json").write_text(json.dumps(config), encoding="utf-8")
    elif how == "config-n-layers-huge":  # must not try to build a billion layers
        config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        config["model"]["n_layers"] = 10**9
        (ckpt / "config.json").write_text(json.dumps(config), encoding="utf-8")
    elif how == "config-hidden-size-float":
        config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        config["model"]["hidden_size"] = 32.0
        (ckpt / "config.json").write_text(json.dumps(config), encoding="utf-8")
        return "config.json"
    elif how.startswith("random-bytes-in-"):
        name = how.removeprefix("random-bytes-in-")
        (ckpt / name).write_bytes(rng.bytes(int(rng.integers(0, 3000))))
        return name
    else:  # pragma: no cover
        raise AssertionError(how)
    return "model.safetensors"


DAMAGES = [
    "truncated-weights",
    "bit-flipped-weights",
    "truncated-weights-rehashed",
    "header-bit-flipped-rehashed",
    "missing-tokenizer",
    "missing-weights",
    "missing-config",
    "other-vocabulary-config-and-tokenizer",
    "other-vocabulary-tokenizer-rehashed",
    "config-vocab-size-edited",
    "config-hidden-size-edited",
    "config-n-layers-huge",
    "config-hidden-size-float",
    "random-bytes-in-config.json",
    "random-bytes-in-model.safetensors",
    "random-bytes-in-tokenizer.json",
    "random-bytes-in-training_state.json",
    "random-bytes-in-training_state.safetensors",
]


@contextmanager
def _no_hang(seconds=60):
    """Fail (instead of hanging the suite) if the block runs for more than ``seconds``."""

    def expire(signum, frame):
        pytest.fail(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_checkpoint_is_a_checkpoint_error_naming_the_file(good_last, tmp_path, how):
    named = _damage(good_last, how, tmp_path)
    with _no_hang(), pytest.raises(CheckpointError) as info:
        load_checkpoint(good_last, with_training_state=True)
    assert named in str(info.value)


def test_an_interrupted_save_of_best_is_still_found_from_the_run_directory(good_last):
    """Killed between the two renames of a `best` save: the run directory resolves to `.best.old`."""
    run = good_last.parent
    shutil.copytree(good_last, run / ".best.old")  # `best` itself is gone
    assert resolve_checkpoint(run) == run / ".best.old"
    assert resolve_checkpoint(run / "best") == run / ".best.old"
    shutil.rmtree(run / ".best.old")
    assert resolve_checkpoint(run) == run / "last"


def test_damaged_training_state_does_not_stop_sampling_but_stops_resume(good_last, corpus_file, tmp_path):
    _damage(good_last, "random-bytes-in-training_state.safetensors", tmp_path)
    assert charrnn.load(good_last, device="cpu").generate("a", length=3, seed=0)  # sampling needs no training state
    config = tiny_train_config(corpus_file, tmp_path / "run", resume=str(good_last))
    with pytest.raises(CheckpointError, match="training_state.safetensors is damaged"):
        Trainer(config)


@pytest.mark.parametrize(
    "train_section",
    [[1, 2], {"seq_len": "sixteen"}, {"batch_size": -3}, {"lr": None}],
    ids=["not-an-object", "wrong-type", "invalid-value", "null-lr"],
)
def test_resume_from_a_config_with_damaged_training_settings_is_a_checkpoint_error(
    good_last, corpus_file, tmp_path, train_section
):
    config_path = good_last / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["train"] = train_section if isinstance(train_section, list) else {**config["train"], **train_section}
    config_path.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"config.json holds invalid training settings"):
        Trainer(tiny_train_config(corpus_file, tmp_path / "run", resume=str(good_last)))


def test_sample_py_reports_a_damaged_checkpoint_in_one_line(good_last, tmp_path, subprocess_env):
    _damage(good_last, "truncated-weights", tmp_path)
    proc = run_python([SAMPLE_SCRIPT, "--checkpoint", good_last, "--device", "cpu", "--length", "5"], subprocess_env, tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: ") and "model.safetensors is damaged" in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("how", "fragment"),
    [
        ("missing-tokenizer", "tokenizer.json is missing"),
        ("random-bytes-in-config.json", "config.json is not valid JSON"),
        ("config-n-layers-huge", "model.safetensors does not fit the model in config.json"),
        ("other-vocabulary-tokenizer-rehashed", "come from different runs"),
    ],
)
def test_sample_main_reports_a_damaged_checkpoint_in_one_line(good_last, tmp_path, capsys, how, fragment):
    _damage(good_last, how, tmp_path)
    assert sample_main(["--checkpoint", str(good_last), "--device", "cpu", "--length", "5"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and fragment in captured.err and len(captured.err.splitlines()) == 1


# --- 7. no code runs at load -------------------------------------------------------------------


class _WritesAMarker:
    """Unpickling this object creates the file at ``marker``: code from the file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": _WritesAMarker(marker)})


def _torch_save_bytes(marker: Path, tmp_path: Path) -> bytes:
    path = tmp_path / "scratch.pt"
    torch.save({"model": _WritesAMarker(marker)}, path)
    data = path.read_bytes()
    path.unlink()
    return data


def test_the_pickles_used_here_really_run_code_when_unpickled(tmp_path):
    pickle.loads(_pickle_bytes(tmp_path / "sanity1")).get("state_dict").close()
    assert (tmp_path / "sanity1").exists()
    (tmp_path / "sanity.pt").write_bytes(_torch_save_bytes(tmp_path / "sanity2", tmp_path))
    torch.load(tmp_path / "sanity.pt", weights_only=False)["model"].close()
    assert (tmp_path / "sanity2").exists()


@pytest.mark.parametrize("file_name", ["pytorch_model.bin", "model.pt", "checkpoint.pth"])
def test_a_folder_holding_a_torch_pickle_is_refused_without_running_it(tmp_path, file_name):
    marker = tmp_path / "pwned"
    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / file_name).write_bytes(_torch_save_bytes(marker, tmp_path))
    for target in (folder, folder / file_name):
        with pytest.raises(CheckpointError, match="never"):
            load_checkpoint(target)
        with pytest.raises(CheckpointError):
            charrnn.load(target, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "rehash"),
    [
        ("model.safetensors", False),
        ("model.safetensors", True),  # its checksum updated too: the loader must still not unpickle it
        ("tokenizer.json", True),
        ("training_state.safetensors", True),
        ("training_state.json", True),
    ],
)
def test_a_pickle_in_place_of_a_checkpoint_file_is_refused_without_running_it(good_last, tmp_path, name, rehash):
    marker = tmp_path / "pwned"
    (good_last / name).write_bytes(_pickle_bytes(marker) if name.endswith(".json") else _torch_save_bytes(marker, tmp_path))
    if rehash:
        _rehash(good_last, name)
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(good_last, with_training_state=True)
    assert not marker.exists()


def test_a_pickle_beside_a_good_checkpoint_is_ignored(good_last, tmp_path):
    marker = tmp_path / "pwned"
    for file_name in ("pytorch_model.bin", "model.pt", "optimizer.pt"):
        (good_last / file_name).write_bytes(_torch_save_bytes(marker, tmp_path))
    assert load_checkpoint(good_last, with_training_state=True).state["step"] == 600
    assert sample_main(["--checkpoint", str(good_last), "--device", "cpu", "--length", "5", "--seed", "1"]) == 0
    assert not marker.exists()


def test_sample_py_refuses_a_pickled_checkpoint_without_running_it(tmp_path, subprocess_env):
    marker = tmp_path / "pwned"
    (tmp_path / "model.pt").write_bytes(_torch_save_bytes(marker, tmp_path))
    proc = run_python([SAMPLE_SCRIPT, "--checkpoint", tmp_path / "model.pt", "--device", "cpu"], subprocess_env, tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "never loaded" in proc.stderr
    assert not marker.exists()

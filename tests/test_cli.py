"""train.py and sample.py end to end, as a user runs them (subprocesses, no network)."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import PYTHON, TINY_TRAIN_FLAGS, run_python
from conftest import SAMPLE_SCRIPT as SAMPLE
from conftest import TRAIN_SCRIPT as TRAIN


def run(args, env, cwd):
    return run_python(args, env, cwd, timeout=180)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, corpus_file, subprocess_env):
    """One `train.py` run on the tiny corpus, shared by the tests of this module."""
    work = tmp_path_factory.mktemp("cli")
    out = work / "run"
    proc = run(
        [TRAIN, "--data", str(corpus_file), "--max-iters", "20", "--eval-interval", "10", "--out", str(out), *TINY_TRAIN_FLAGS],
        subprocess_env,
        cwd=work,
    )
    return proc, out, work


def test_train_writes_best_and_last_checkpoints(cli_run):
    proc, out, _ = cli_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("best", "last"):
        for file in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (out / name / file).is_file(), f"{name}/{file} missing"
    config = json.loads((out / "last" / "config.json").read_text(encoding="utf-8"))
    assert config["step"] == 20
    assert config["model"]["hidden_size"] == 32 and config["model"]["embedding_size"] == 8
    assert config["train"]["batch_size"] == 4 and config["train"]["seq_len"] == 16
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in metrics if "val_loss" in r] == [10, 20]


def test_train_tells_how_to_sample(cli_run):
    proc, out, _ = cli_run
    assert f"python sample.py --checkpoint {out}" in proc.stderr
    assert str(out / "best") in proc.stderr


def test_sample_prints_prompt_and_length_characters_deterministically(cli_run, subprocess_env):
    _, out, work = cli_run
    args = [SAMPLE, "--checkpoint", str(out), "--prompt", "ab", "--length", "50", "--seed", "3", "--device", "cpu"]
    first = run(args, subprocess_env, cwd=work)
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    text = first.stdout
    assert text.startswith("ab")
    assert text.endswith("\n")
    assert len(text) == len("ab") + 50 + 1  # prompt, 50 characters, final newline
    second = run(args, subprocess_env, cwd=work)
    assert second.returncode == 0, second.stderr
    assert second.stdout == text


@pytest.mark.parametrize("precision", ["float32", "int8", "bfloat16"])
def test_sample_runs_at_each_precision(cli_run, subprocess_env, precision):
    _, out, work = cli_run
    args = [
        SAMPLE,
        "--checkpoint",
        str(out),
        "--prompt",
        "ab",
        "--length",
        "30",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--num-samples",
        "9",
        "--precision",
        precision,
    ]
    proc = run(args, subprocess_env, cwd=work)
    assert proc.returncode == 0, proc.stderr
    samples = proc.stdout.split("--- sample ")[1:]
    assert len(samples) == 9 and all(len(s.split("\n", 1)[1]) == len("ab") + 30 + 1 for s in samples)


def test_sample_into_a_pipe_closed_early_stops_quietly(cli_run, subprocess_env):
    """`sample.py ... | head` must not end in a BrokenPipeError traceback."""
    _, out, work = cli_run
    args = [SAMPLE, "--checkpoint", str(out), "--length", "200", "--num-samples", "9", "--device", "cpu"]
    proc = subprocess.Popen(
        [PYTHON, *args], cwd=work, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    proc.stdout.close()  # the reader is gone before the first line is written
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 141, stderr
    assert "Traceback" not in stderr and "Error" not in stderr


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("script", "args", "fragments"),
    [
        ("train", ["--data", "/no/such/file", "--max-iters", "1", "--device", "cpu"], ["'/no/such/file' not found"]),
        ("train", ["--dropout", "1.5"], ["--dropout must be in [0, 1)", "1.5"]),
        ("sample", ["--temperature", "-1"], ["temperature must be >= 0"]),
        ("sample", ["--checkpoint", "/no/such/run", "--device", "cpu"], ["/no/such/run", "not found"]),
    ],
    ids=["train-missing-data", "train-bad-dropout", "sample-negative-temperature", "sample-missing-checkpoint"],
)
def test_user_mistakes_print_one_error_line(tmp_path, subprocess_env, script, args, fragments):
    proc = run([TRAIN if script == "train" else SAMPLE, *args], subprocess_env, cwd=tmp_path)
    _assert_one_line_error(proc, *fragments)
    assert proc.returncode == 2
    assert not (tmp_path / "checkpoints").exists()  # nothing was written


# Every platform module charrnn might reach for, made unimportable (as on Windows), before charrnn loads.
WITHOUT_POSIX = (
    "import sys\n"
    "for name in ('fcntl', 'readline', 'termios'):\n"
    "    sys.modules[name] = None  # import raises ImportError\n"
    "from charrnn.cli.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_train_sample_and_chat_run_without_fcntl_readline_or_termios(corpus_file, subprocess_env, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", corpus_file, "--max-iters", "20", "--eval-interval", "10", "--out", out, *TINY_TRAIN_FLAGS]
    trained = run_python(["-c", WITHOUT_POSIX, *map(str, args)], subprocess_env, tmp_path)
    assert trained.returncode == 0, trained.stderr
    again = run_python(["-c", WITHOUT_POSIX, *map(str, args)], subprocess_env, tmp_path)
    assert again.returncode == 2 and "holds a run already" in again.stderr  # the run folder is still guarded
    sampled = run_python(
        ["-c", WITHOUT_POSIX, "sample", "--checkpoint", str(out), "--prompt", "ab", "--length", "20", "--seed", "1"],
        subprocess_env,
        tmp_path,
    )
    assert sampled.returncode == 0 and sampled.stdout.startswith("ab"), sampled.stderr
    (tmp_path / "typed.txt").write_text("hello\n/quit\n", encoding="utf-8")
    with open(tmp_path / "typed.txt", encoding="utf-8") as typed:
        chat = run_python(
            ["-c", WITHOUT_POSIX, "chat", "--checkpoint", str(out), "--device", "cpu", "--seed", "1"],
            subprocess_env,
            tmp_path,
            stdin=typed,
        )
    assert chat.returncode == 0 and chat.stdout.strip() and "Traceback" not in chat.stderr, chat.stderr

"""Bad input, everywhere: each mistake is a clear one-line error, never a traceback or a hang.

The command-line cases run the ``main`` of train.py / sample.py in-process, and as real
processes where the process is the point (argparse's exit, undecodable bytes in argv);
the library cases cover the long tail of values.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tracemalloc
from contextlib import redirect_stderr, redirect_stdout
from unittest import mock

import pytest
from conftest import PYTHON, SAMPLE_SCRIPT, TINY_TRAIN_FLAGS, TRAIN_SCRIPT, tiny_model_config, tiny_train_config

from charrnn.cli.sample import main as sample_main
from charrnn.cli.train import main as train_main
from charrnn.config import ModelConfig, SampleConfig, TrainConfig
from charrnn.errors import CheckpointError, ConfigError, CorpusError, PromptError
from charrnn.generation.sampler import MAX_PROMPT_CHARS
from charrnn.training.trainer import Trainer

LONG_PROMPT_CHARS = 110_000  # over the 100,000 limit, under Linux's 128 KiB cap on one argument


def _corpora(folder):
    """Bad corpora, written to ``folder``: name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "empty": b"",
        "binary": bytes(range(256)) * 8,
        "latin1": "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 50,
        "short": b"ROMEO: hi\n" * 5,  # 50 characters: far less than one batch of 4 x 16
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_bytes(data)
    return paths


def _train_args(data, *extra):
    return [TRAIN_SCRIPT, "--data", data, "--max-iters", "3", *TINY_TRAIN_FLAGS, *extra]


# name -> (argv builder, expected exit code, fragments of stderr, fragments that must NOT be in stdout)
def _cli_cases(corpora, trained_run, moved_run, tmp):
    best, last = trained_run.best, trained_run.last
    sample = [SAMPLE_SCRIPT, "--checkpoint", best, "--device", "cpu", "--length", "20", "--seed", "1"]
    return {
        "train-empty-corpus": (_train_args(corpora["empty"]), 2, ["empty.txt is empty"]),
        "train-binary-corpus": (_train_args(corpora["binary"]), 2, ["binary.txt looks like a binary file"]),
        "train-non-utf8-corpus": (_train_args(corpora["latin1"]), 2, ["latin1.txt is not valid UTF-8 (byte 3, line 1)"]),
        "train-corpus-shorter-than-a-batch": (
            _train_args(corpora["short"]),
            2,
            ["short.txt", "the training split has 45 characters", "needs at least 80"],
        ),
        "train-seq-len-0": (_train_args(corpora["short"], "--seq-len", "0"), 2, ["--seq-len must be at least 1, got 0"]),
        "train-negative-hidden-size": (
            _train_args(corpora["short"], "--hidden-size", "-5"),
            2,
            ["--hidden-size must be at least 1, got -5"],
        ),
        "train-unknown-cell": (
            _train_args(corpora["short"], "--cell", "transformer"),
            2,
            ["argument --cell: invalid choice: 'transformer'"],
        ),
        "sample-top-p-above-1": ([*sample, "--top-p", "1.5"], 2, ["top_p must be in (0, 1]", "1.5"]),
        "sample-unseen-prompt": ([*sample, "--prompt", "0123456789"], 2, ["made only of characters the model never saw"]),
        "sample-long-prompt": (
            [*sample, "--prompt", "a" * LONG_PROMPT_CHARS],
            2,
            [f"the prompt has {LONG_PROMPT_CHARS:,} characters; the limit is 100,000"],
        ),
        # A byte that is not UTF-8 in the command line (Python holds it as a lone surrogate).
        "sample-non-utf8-prompt-bytes": (
            [*sample, "--prompt", "ab" + os.fsdecode(b"\xff")],
            0,
            ["warning: the model never saw '\ufffd'; those characters are read as <unk>"],
        ),
        "resume-other-shape": (
            [TRAIN_SCRIPT, "--resume", last, "--hidden-size", "64", "--max-iters", "601"],
            2,
            ["--hidden-size 64 does not fit the checkpoint, whose model has 32"],
        ),
        "resume-other-hyperparameters": (
            [
                TRAIN_SCRIPT,
                "--resume",
                moved_run / "last",
                "--max-iters",
                "603",
                "--lr",
                "0.005",
                "--batch-size",
                "8",
                "--eval-interval",
                "3",
            ],
            0,
            [
                "warning: resuming with lr=0.005; the run was trained with 0.01",
                "warning: resuming with batch_size=8; the run was trained with 16",
                "note: --batch-size changed",
                "reached --max-iters 603 at step 603",
                str(moved_run / "last"),
            ],
        ),
    }


# Cases whose point is the real process: argparse's own exit, and bytes in the real argv.
# The others run in-process through the same ``main`` that train.py and sample.py call.
PROCESS_CASES = ("train-unknown-cell", "sample-non-utf8-prompt-bytes")


def _run_in_process(args, cwd, env):
    """``main`` of train.py or sample.py on ``args``, as the script would run it: (exit code, stdout, stderr)."""
    main = {TRAIN_SCRIPT: train_main, SAMPLE_SCRIPT: sample_main}[args[0]]
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    with mock.patch.dict(os.environ, env, clear=True), redirect_stdout(out), redirect_stderr(err):
        os.chdir(cwd)
        try:
            code = main([str(a) for a in args[1:]])
        except SystemExit as exc:
            code = exc.code
        finally:
            os.chdir(here)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, subprocess_env, trained_run):
    """Run every command-line case; name -> (case, completed process)."""
    tmp = tmp_path_factory.mktemp("bad_input")
    corpora = _corpora(tmp / "corpora")
    moved_run = tmp / "moved-run"  # a copy of the trained run: resuming it must write here, not to the original
    shutil.copytree(trained_run.run_dir, moved_run)
    cases = _cli_cases(corpora, trained_run, moved_run, tmp)
    procs = {
        name: subprocess.Popen(
            [PYTHON, *map(str, cases[name][0])],
            cwd=tmp,
            env=subprocess_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        for name in PROCESS_CASES
    }
    results = {}
    try:
        for name, (args, _, _) in cases.items():  # in-process while the processes start
            if name not in procs:
                results[name] = (cases[name], subprocess.CompletedProcess(args, *_run_in_process(args, tmp, subprocess_env)))
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=180)
            results[name] = (cases[name], subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    results["_paths"] = (trained_run, moved_run, tmp)
    return results


# (test_cli.py runs a missing corpus, --dropout 1.5 and a negative temperature as processes already.)
CLI_CASES = [
    "train-empty-corpus",
    "train-binary-corpus",
    "train-non-utf8-corpus",
    "train-corpus-shorter-than-a-batch",
    "train-seq-len-0",
    "train-negative-hidden-size",
    "train-unknown-cell",
    "sample-top-p-above-1",
    "sample-unseen-prompt",
    "sample-long-prompt",
    "sample-non-utf8-prompt-bytes",
    "resume-other-shape",
    "resume-other-hyperparameters",
]


@pytest.mark.parametrize("name", CLI_CASES)
def test_command_line_mistakes_exit_with_a_clear_message_and_no_traceback(cli_results, name):
    (args, code, fragments), proc = cli_results[name]
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr
    if name == "sample-non-utf8-prompt-bytes":
        assert proc.stdout.startswith("ab\ufffd") and len(proc.stdout) == len("ab\ufffd") + 20 + 1
        assert len(proc.stderr.splitlines()) == 1  # one warning line, not a source listing
    if code == 0:
        return
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if name == "train-unknown-cell":  # argparse: a usage line, then the error
        assert lines[-1].startswith("train.py: error: ")
    else:
        assert lines == [lines[0]] and lines[0].startswith("error: "), proc.stderr
    assert proc.stdout == ""  # nothing was printed before the error: not even the prompt


def test_nothing_is_written_for_a_refused_run(cli_results):
    _, _, tmp = cli_results["_paths"]
    assert not (tmp / "checkpoints").exists()


def test_a_resumed_copy_of_a_run_writes_beside_its_checkpoint_not_to_the_original(cli_results):
    trained_run, moved_run, _ = cli_results["_paths"]
    from charrnn.checkpoint import load_checkpoint

    assert load_checkpoint(moved_run / "last", with_training_state=True).state["step"] == 603
    assert load_checkpoint(trained_run.last, with_training_state=True).state["step"] == 600  # untouched


# --- the same through the library, and the long tail of values ------------------------------------


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (TrainConfig, {"seq_len": 0}, "seq_len must be at least 1, got 0"),
        (TrainConfig, {"seq_len": -3}, "seq_len must be at least 1"),
        (TrainConfig, {"batch_size": 0}, "batch_size must be at least 1"),
        (TrainConfig, {"lr": float("nan")}, "lr must be a positive number"),
        (TrainConfig, {"lr": float("inf")}, "lr must be a positive number"),
        (TrainConfig, {"lr": 0.0}, "lr must be a positive number"),
        (TrainConfig, {"min_lr": float("nan")}, "min_lr must be in"),
        (TrainConfig, {"lr": 1e-3, "min_lr": 1.0}, "min_lr must be in"),
        (TrainConfig, {"weight_decay": float("nan")}, "weight_decay must be >= 0"),
        (TrainConfig, {"grad_clip": -1.0}, "grad_clip must be >= 0"),
        (TrainConfig, {"max_time": float("nan")}, "max_time must be >= 0"),
        (TrainConfig, {"max_iters": 0, "max_time": 0}, "set a budget"),
        (TrainConfig, {"eval_interval": 0}, "eval_interval must be at least 1"),
        (TrainConfig, {"patience": -1}, "patience must be >= 0"),
        (TrainConfig, {"data": ""}, "data must name a corpus"),
        (TrainConfig, {"seq_len": 16.5}, "seq_len must be int or None, got 16.5"),
        (TrainConfig, {"out": 3}, "out must be str or None"),
        (ModelConfig, {"hidden_size": -5}, "hidden_size must be at least 1, got -5"),
        (ModelConfig, {"embedding_size": 0}, "embedding_size must be at least 1"),
        (ModelConfig, {"n_layers": 0}, "n_layers must be at least 1"),
        (ModelConfig, {"dropout": 1.5}, r"dropout must be in \[0, 1\), got 1.5"),
        (ModelConfig, {"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        (ModelConfig, {"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        (ModelConfig, {"dropout": float("nan")}, r"dropout must be in \[0, 1\)"),
        (ModelConfig, {"cell": "transformer"}, "unknown cell 'transformer'"),
        (ModelConfig, {"hidden_size": 32.0}, "hidden_size must be int or None, got 32.0"),
        (ModelConfig, {"n_layers": True}, "n_layers must be int or None, got True"),
        (SampleConfig, {"temperature": -1.0}, "temperature must be >= 0"),
        (SampleConfig, {"temperature": float("inf")}, "temperature must be >= 0"),
        (SampleConfig, {"temperature": float("nan")}, "temperature must be >= 0"),
        (SampleConfig, {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        (SampleConfig, {"top_p": 1.01}, r"top_p must be in \(0, 1\]"),
        (SampleConfig, {"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
        (SampleConfig, {"top_k": -1}, "top_k must be >= 0"),
        (SampleConfig, {"length": -1}, "length must be >= 0"),
        (SampleConfig, {"stop": ("",)}, "stop strings must be non-empty"),
    ],
)
def test_bad_settings_are_config_errors(cls, values, message):
    with pytest.raises(ConfigError, match=message):
        cls(**values)


def _one_error_line(capsys):
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0], captured.out


def test_train_main_reports_mistakes_in_one_line(tmp_path, capsys, corpus_file, trained_run):
    a_file = tmp_path / "a-file"
    a_file.write_text("x", encoding="utf-8")
    (tmp_path / "empty-folder").mkdir()
    cases = [
        (["--data", str(tmp_path / "missing.txt"), "--max-iters", "1"], "missing.txt' not found"),
        (["--data", str(tmp_path / "empty-folder"), "--max-iters", "1"], "holds no non-empty text files"),
        (
            ["--data", str(corpus_file), "--max-iters", "2", "--out", str(a_file / "run"), *TINY_TRAIN_FLAGS],
            "cannot create the run directory",
        ),
        (["--resume", str(tmp_path / "no-run" / "last"), "--max-iters", "1"], "not found"),
        (["--resume", str(trained_run.best), "--max-iters", "1"], "holds no training state"),
        (["--data", str(corpus_file), "--lr", "nan", "--max-iters", "1"], "--lr must be a positive number"),
        (["--data", str(corpus_file), "--max-iters", "0", "--max-time", "0"], "set a budget"),
    ]
    for argv, fragment in cases:
        assert train_main(argv) == 2, argv
        line, _ = _one_error_line(capsys)
        assert fragment in line, (argv, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "empty-folder"]  # nothing written anywhere


def test_sample_main_reports_mistakes_in_one_line(tmp_path, capsys, trained_run):
    base = ["--checkpoint", str(trained_run.best), "--device", "cpu", "--length", "5"]
    cases = [
        ([*base, "--top-k", "-1"], "top_k must be >= 0 (0 turns it off), got -1"),
        ([*base, "--top-p", "0"], "top_p must be in (0, 1]"),
        ([*base, "--temperature=-1e-9"], "temperature must be >= 0"),
        ([*base, "--num-samples", "0"], "num_samples must be from 1 to 4,096, got 0"),
        ([*base, "--length", "-1"], "length must be >= 0"),
        ([*base, "--prompt", "\u0416\u0416"], "made only of characters the model never saw"),
        (["--checkpoint", str(tmp_path), "--device", "cpu"], "holds no config.json"),
    ]
    for argv, fragment in cases:
        assert sample_main(argv) == 2, argv
        line, out = _one_error_line(capsys)
        assert fragment in line, (argv, line)
        assert out == ""


@pytest.mark.parametrize("use", ["generate", "stream", "generate_many", "predict_next", "score", "chat"])
def test_a_one_megabyte_prompt_fails_fast_without_reading_it(sampler, use):
    prompt = "ROMEO: " * (1_000_000 // 7)
    assert len(prompt) > MAX_PROMPT_CHARS
    session = sampler.chat(seed=1)  # made (and its module imported) before memory is traced
    calls = {
        "generate": lambda: sampler.generate(prompt, length=5),
        "stream": lambda: next(sampler.stream(prompt, length=5)),
        "generate_many": lambda: sampler.generate_many(prompt, 2, length=5),
        "predict_next": lambda: sampler.predict_next(prompt),
        "score": lambda: sampler.score(prompt),
        "chat": lambda: session.send(prompt),
    }
    tracemalloc.start()
    try:
        with pytest.raises(PromptError, match=r"the prompt has 999,999 characters; the limit is 100,000"):
            calls[use]()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200_000  # the prompt was refused before it was copied or encoded (4 MB as UTF-32)


def test_resume_with_another_model_shape_is_a_config_error(trained_run, corpus_file, tmp_path):
    config = tiny_train_config(corpus_file, tmp_path / "run", resume=str(trained_run.last))
    for shape in ({"hidden_size": 48}, {"n_layers": 3}, {"cell": "gru"}, {"embedding_size": 4}):
        with pytest.raises(ConfigError, match="does not fit the checkpoint"):
            Trainer(config, tiny_model_config(**shape))
    assert not (tmp_path / "run").exists()


def test_resume_with_a_new_batch_layout_warns_and_trains_on(trained_run, corpus_file, tmp_path, capsys):
    run = shutil.copytree(trained_run.run_dir, tmp_path / "run")
    config = tiny_train_config(
        corpus_file, run, resume=str(run / "last"), max_iters=604, eval_interval=2, batch_size=5, seq_len=9
    )
    trainer = Trainer(config, tiny_model_config(), explicit={"batch_size", "seq_len", "max_iters", "eval_interval"})
    err = capsys.readouterr().err
    assert "warning: resuming with batch_size=5; the run was trained with 16" in err
    assert "warning: resuming with seq_len=9; the run was trained with 32" in err
    assert "note: --batch-size and --seq-len changed" in err
    assert trainer.hidden is None and trainer.position.index == 0
    assert trainer.run().step == 604


def test_resume_on_a_shorter_corpus_starts_the_next_epoch(trained_run, tmp_path, corpus_text, capsys):
    run = shutil.copytree(trained_run.run_dir, tmp_path / "run")
    short = tmp_path / "short.txt"
    short.write_text(corpus_text[:1500], encoding="utf-8")
    config = tiny_train_config(short, run, resume=str(run / "last"), max_iters=602, batch_size=16, seq_len=32)
    trainer = Trainer(config, tiny_model_config(), explicit={"data", "max_iters"})
    assert trainer.position.index < trainer.streams.batches_in_epoch(trainer.position.epoch)
    assert "the corpus is shorter than it was" in capsys.readouterr().err
    assert trainer.run().step == 602


@pytest.mark.parametrize(
    ("text", "error"),
    [("", "is empty"), ("\x00abc", "binary"), ("abc", "too short")],
)
def test_bad_corpora_through_the_library(tmp_path, text, error):
    corpus = tmp_path / "c.txt"
    corpus.write_text(text, encoding="utf-8")
    with pytest.raises(CorpusError, match=error):
        Trainer(tiny_train_config(corpus, tmp_path / "run"), tiny_model_config())


def test_checkpoint_given_as_a_file_is_a_clear_error(tmp_path):
    from charrnn.checkpoint import load_checkpoint

    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint"):
        load_checkpoint(weights)


def test_abbreviated_flags_count_as_typed_on_resume(trained_run, tmp_path, capsys):
    """argparse takes --hidden for --hidden-size: the resume checks must see it as typed too."""
    from charrnn.cli.options import typed_flags
    from charrnn.cli.train import build_parser

    argv = ["--resume", "RUN", "--max-t", "60", "--hidden", "64"]
    assert typed_flags(lambda defaults: build_parser(defaults), argv) == {"resume", "max_time", "hidden_size"}
    assert train_main(["--resume", str(trained_run.last), "--max-t", "60", "--hidden", "64", "--device", "cpu"]) == 2
    assert "--hidden-size 64 does not fit the checkpoint" in capsys.readouterr().err


def test_a_new_run_over_a_folder_that_holds_a_run_is_refused_and_the_run_is_left_as_it_was(tmp_path, small_corpus_file):
    from charrnn.training.callbacks import MetricsLog
    from charrnn.training.trainer import train

    run = tmp_path / "run"
    train(tiny_train_config(small_corpus_file, run), tiny_model_config(), callbacks=[MetricsLog()])
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"holds a run already \(best, last, metrics.jsonl\).*--resume .*another --out"):
        train(tiny_train_config(small_corpus_file, run, max_iters=10), tiny_model_config(), callbacks=[MetricsLog()])
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # Resuming it goes on in the same folder; a fine-tune from it must go elsewhere.
    train(tiny_train_config(small_corpus_file, run, max_iters=30, resume=str(run)), tiny_model_config(), callbacks=[])
    with pytest.raises(ConfigError, match="holds a run already"):
        train(tiny_train_config(small_corpus_file, run, init_from=str(run)), ModelConfig(), callbacks=[])

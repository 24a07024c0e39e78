"""Hostile input, class by class: no hang, no traceback, one sentence, nothing overwritten that was not ours.

Each class of attack is one parametrised test whose cases run the real programs (train.py,
sample.py, ``python -m charrnn chat / inspect / score``) as processes. The cases of a class
are launched together, so their start-up costs overlap, and each must end within HANG
seconds: a case still running then has hung. Each asserts its exit status, exactly one
``error:`` line naming the problem, no traceback, and that the files it was aimed at are
as they were. The server's class is in tests/test_serve.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, SAMPLE_SCRIPT, TINY_TRAIN_FLAGS, TRAIN_SCRIPT, tiny_model_config, tiny_train_config

from charrnn._io import LOCK_FILE, _file_lock, folder_lock
from charrnn.data.token_cache import TOKENS_FILE, cache_folder, corpus_tokens
from charrnn.training.trainer import train

HANG = 90  # seconds; the slowest case (a chat that loads a model) takes about 3 on a busy 2-core machine
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass
class Case:
    argv: list[str]  # after the Python interpreter
    fragment: str  # must be in the one "error:" line
    stdin: bytes = b""
    code: int = 2  # a chat reports a bad command and goes on: 0 at /quit
    env: dict[str, str] | None = None
    user: list[str] | None = None  # a command prefix that runs the case as another user


def _launch(cases: dict[str, Case], env: dict[str, str], cwd: Path) -> dict[str, tuple[int | None, str]]:
    """Run every case at once; name -> (exit status, or None if it hung; stdout + stderr)."""
    procs = {}
    for name, case in cases.items():
        procs[name] = subprocess.Popen(
            [*(case.user or []), PYTHON, *map(str, case.argv)],
            cwd=cwd,
            env={**env, **(case.env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    results = {}
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(cases[name].stdin, timeout=HANG)
            results[name] = (proc.returncode, out.decode("utf-8", "replace"))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            results[name] = (None, out.decode("utf-8", "replace"))
    return results


def _assert_one_sentence(name: str, case: Case, result: tuple[int | None, str]) -> None:
    code, out = result
    assert code is not None, f"{name} hung (killed after {HANG} s):\n{out[-2000:]}"
    assert "Traceback" not in out, f"{name} printed a traceback:\n{out[-3000:]}"
    assert code == case.code, f"{name} exited {code}, expected {case.code}:\n{out[-2000:]}"
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1, f"{name}: expected one error line, got {errors}\n{out[-2000:]}"
    assert case.fragment in errors[0], f"{name}: {case.fragment!r} not in {errors[0]!r}"


def _fingerprint(path: Path) -> str:
    """What a path is, without reading a FIFO or a device: its type, and a regular file's sha256."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"link -> {os.readlink(path)}"
    if stat.S_ISREG(st.st_mode):
        return "file " + hashlib.sha256(path.read_bytes()).hexdigest()
    if stat.S_ISDIR(st.st_mode):
        return "dir " + ",".join(sorted(f"{p.name}:{_fingerprint(p)}" for p in path.iterdir()))
    return f"special {stat.S_IFMT(st.st_mode)} {st.st_rdev}"


@pytest.fixture(scope="module")
def arena(trained_run, tmp_path_factory) -> Path:
    """A folder of traps beside copies of the tiny trained run."""
    root = tmp_path_factory.mktemp("arena")
    shutil.copytree(trained_run.run_dir, root / "good")
    os.mkfifo(root / "fifo")
    (root / "zero").symlink_to("/dev/zero")
    (root / "folder").mkdir()
    for name, damage in {
        "fifo-weights": lambda best: (os.remove(best / "model.safetensors"), os.mkfifo(best / "model.safetensors")),
        "zero-config": lambda best: (os.remove(best / "config.json"), (best / "config.json").symlink_to("/dev/zero")),
        "huge-config": lambda best: os.truncate(best / "config.json", 1 << 30),  # sparse: 1 GB of zeros on no disk
        "fifo-tokenizer": lambda best: (os.remove(best / "tokenizer.json"), os.mkfifo(best / "tokenizer.json")),
    }.items():
        shutil.copytree(trained_run.best, root / name / "best")
        damage(root / name / "best")
    if IS_ROOT:  # our own device node, equal to /dev/null: the real ones are never aimed at
        os.mknod(root / "device", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return root


def _sample(checkpoint: Path | str, *extra: str) -> list[str]:
    return [SAMPLE_SCRIPT, "--checkpoint", str(checkpoint), "--device", "cpu", "--length", "5", "--seed", "1", *extra]


def _chat(arena: Path, *extra: str) -> list[str]:
    return ["-m", "charrnn", "chat", "--checkpoint", str(arena / "good"), "--device", "cpu", "--seed", "1", *extra]


def _train(data: Path | str, out: Path | str, *extra: str) -> list[str]:
    return [TRAIN_SCRIPT, "--data", str(data), "--out", str(out), "--max-iters", "2", *TINY_TRAIN_FLAGS, *extra]


def _run_class(cases: dict[str, Case], env: dict[str, str], cwd: Path, watched: list[Path]) -> None:
    before = {p: _fingerprint(p) for p in watched}
    results = _launch(cases, env, cwd)
    for name, case in cases.items():
        _assert_one_sentence(name, case, results[name])
    assert {p: _fingerprint(p) for p in watched} == before, "a case changed a file it was aimed at"


# --- reading: special files and unbounded reads --------------------------------------------------


def test_special_and_endless_files_are_refused_without_reading_them(arena, subprocess_env, tmp_path, corpus_file):
    fifo, zero = arena / "fifo", arena / "zero"
    cases = {
        "sample: model.safetensors is a FIFO": Case(_sample(arena / "fifo-weights"), "it is a FIFO"),
        "sample: tokenizer.json is a FIFO": Case(_sample(arena / "fifo-tokenizer"), "it is a FIFO"),
        "sample: config.json links to /dev/zero": Case(_sample(arena / "zero-config"), "it is a character device"),
        "sample: config.json is 1 GB": Case(_sample(arena / "huge-config"), "larger than 16,777,216 bytes"),
        "chat: --preamble-file FIFO": Case(_chat(arena, "--preamble-file", str(fifo)), "it is a FIFO"),
        "chat: --preamble-file /dev/zero": Case(_chat(arena, "--preamble-file", str(zero)), "it is a character device"),
        "chat: /load FIFO": Case(_chat(arena), "it is a FIFO", stdin=f"/load {fifo}\n/quit\n".encode(), code=0),
        "chat: /load /dev/zero": Case(_chat(arena), "character device", stdin=f"/load {zero}\n/quit\n".encode(), code=0),
        "inspect: --text FIFO": Case(
            ["-m", "charrnn", "inspect", "--checkpoint", arena / "good", "--text", fifo, "--out", tmp_path / "p.html"],
            "it is a FIFO",
        ),
        "score: --text-file /dev/zero": Case(
            ["-m", "charrnn", "score", "--checkpoint", arena / "good", "--text-file", zero, "--device", "cpu"],
            "it is a character device",
        ),
        "train: --data FIFO": Case(_train(fifo, tmp_path / "run"), "it is a FIFO"),
        "train: --resume with a FIFO for weights": Case(
            _train(corpus_file, tmp_path / "resumed", "--resume", arena / "fifo-weights" / "best"), "it is a FIFO"
        ),
    }
    _run_class(cases, subprocess_env, tmp_path, [fifo, arena / "good", arena / "fifo-weights", arena / "huge-config"])
    assert not (tmp_path / "p.html").exists()


# --- writing: only absent paths and regular files are replaced -----------------------------------


def test_outputs_never_replace_devices_fifos_folders_or_files_not_ours(arena, subprocess_env, tmp_path, corpus_file):
    page = tmp_path / "page.html"
    page.write_text("<p>an older page</p>", encoding="utf-8")
    foreign = tmp_path / "foreign"
    (foreign / "best").mkdir(parents=True)
    (foreign / "best" / "notes.txt").write_text("someone's notes", encoding="utf-8")
    inspect = ["-m", "charrnn", "inspect", "--checkpoint", arena / "good", "--text", "-", "--device", "cpu"]
    cases = {
        "chat: /save onto a FIFO": Case(_chat(arena), "it is a FIFO", stdin=f"/save {arena / 'fifo'}\n/quit\n".encode(), code=0),
        "chat: /save onto a folder": Case(
            _chat(arena), "it is a directory", stdin=f"/save {arena / 'folder'}\n/quit\n".encode(), code=0
        ),
        "inspect: --out onto a FIFO": Case([*inspect, "--out", arena / "fifo"], "it is a FIFO", stdin=b"ROMEO: the king"),
        "inspect: undecodable text keeps the old page": Case([*inspect, "--out", page], "not UTF-8 text", stdin=b"\xff\xfe"),
        "train: --out holds a 'best' that is not a checkpoint": Case(
            _train(corpus_file, foreign), "is not a charrnn checkpoint: it is left as it is"
        ),
    }
    watched = [arena / "fifo", arena / "folder", page, foreign]
    if IS_ROOT:
        cases["chat: /save onto a device node"] = Case(
            _chat(arena), "it is a character device", stdin=f"/save {arena / 'device'}\n/quit\n".encode(), code=0
        )
        watched.append(arena / "device")
    _run_class(cases, subprocess_env, tmp_path, watched)


def test_a_save_through_a_symlink_replaces_the_file_it_points_to_and_keeps_the_link(sampler, tmp_path):
    target = tmp_path / "real.session"
    target.write_bytes(b"an older session")
    link = tmp_path / "link.session"
    link.symlink_to(target)
    session = sampler.chat(seed=3)
    session.send("ROMEO:")
    session.save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert type(session).load(sampler, target).turns == 1  # the new session landed where the link points


# --- numbers out of range ------------------------------------------------------------------------


def test_numbers_out_of_range_are_refused_where_they_enter(arena, subprocess_env, tmp_path, corpus_file):
    too_big = str(1 << 64)
    cases = {
        "train: --seed 2**64": Case(_train(corpus_file, tmp_path / "a", "--seed", too_big), "--seed must be an integer from 0"),
        "train: --seed -1": Case(_train(corpus_file, tmp_path / "b", "--seed", "-1"), "--seed must be an integer from 0"),
        "sample: --seed 2**64": Case(_sample(arena / "good", "--seed", too_big), "seed must be an integer from 0"),
        "chat: --seed 2**64": Case(_chat(arena, "--seed", too_big), "seed must be an integer from 0"),
        "train: --hidden-size 1e9": Case(_train(corpus_file, tmp_path / "c", "--hidden-size", "1000000000"), "needs about"),
        "train: --batch-size 1e12": Case(_train(corpus_file, tmp_path / "d", "--batch-size", "1000000000000"), "needs about"),
    }
    _run_class(cases, subprocess_env, tmp_path, [arena / "good"])
    for name in "abcd":
        assert not (tmp_path / name).exists()


def test_a_top_k_beyond_the_vocabulary_keeps_every_character(arena, subprocess_env, tmp_path, sampler):
    results = _launch(
        {
            "sample": Case(_sample(arena / "good", "--top-k", str(10**20)), "", code=0),
            "chat": Case(_chat(arena, "--top-k", str(10**20), "--length", "10"), "", stdin=b"hello\n/quit\n", code=0),
        },
        subprocess_env,
        tmp_path,
    )
    for name, (code, out) in results.items():
        assert code == 0 and "Traceback" not in out and "error" not in out, (name, out[-2000:])
    assert sampler.generate("ROMEO:", length=40, seed=5, top_k=10**20) == sampler.generate("ROMEO:", length=40, seed=5)


def test_a_seed_near_2_to_the_63_trains_across_epochs_and_resumes(small_corpus_file, tmp_path):
    # The epoch offset is drawn from seed * 1_000_003 + epoch: it must stay inside 64 bits.
    seed = (1 << 63) - 1
    config = tiny_train_config(small_corpus_file, tmp_path / "run", max_iters=30, eval_interval=15, batch_size=4, seed=seed)
    first = train(config, tiny_model_config(hidden_size=16))
    assert first.step == 30  # an epoch of this corpus is 12 steps: two boundaries crossed
    resumed = train(
        tiny_train_config(small_corpus_file, tmp_path / "run", max_iters=40, resume=str(first.last), seed=seed),
        tiny_model_config(hidden_size=16),
    )
    assert resumed.step == 40


# --- runs: one writer per run directory ----------------------------------------------------------


def _world_readable_tmp() -> Path:
    path = Path(tempfile.mkdtemp(prefix="charrnn-ro-"))
    path.chmod(0o755)
    return path


def test_a_run_directory_takes_one_training_at_a_time_and_read_only_ones_get_a_sentence(
    trained_run, subprocess_env, tmp_path, corpus_file
):
    busy = tmp_path / "busy"
    busy.mkdir()
    # A read-only run to resume. As root every folder is writable, so the case runs as nobody.
    root = _world_readable_tmp()
    try:
        shutil.copy(corpus_file, root / "corpus.txt")
        shutil.copytree(trained_run.run_dir, root / "run")
        for path in [root / "run", *(root / "run").rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        (root / "run").chmod(0o555)
        scratch = root / "scratch"  # the corpus cache and HOME that "nobody" may write
        scratch.mkdir(mode=0o777)
        scratch.chmod(0o777)
        nobody_env = {"CHARRNN_DATA_DIR": str(scratch), "HOME": str(scratch), "HF_HOME": str(scratch)}
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if IS_ROOT else None
        cases = {
            "train: another training holds the run": Case(
                _train(corpus_file, busy), "is being written by another training"
            ),
            "train: --resume into a read-only run": Case(
                [TRAIN_SCRIPT, "--resume", root / "run" / "last", "--data", root / "corpus.txt", "--max-iters", "700",
                 "--device", "cpu", "--no-plot"],
                "cannot write to the run directory",
                env=nobody_env,
                user=as_nobody,
            ),
        }  # fmt: skip
        with folder_lock(busy):  # this test process plays the other training
            _run_class(cases, subprocess_env, tmp_path, [busy, root / "run"])
    finally:
        (root / "run").chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


def _run_lock(kind: str, folder: Path):
    """The folder itself where flock exists; the lock file that stands in for it elsewhere (Windows)."""
    return folder_lock(folder) if kind == "folder" else _file_lock(folder / LOCK_FILE)


@pytest.mark.parametrize("kind", ["folder", "lock file"])
def test_the_run_lock_dies_with_its_holder(tmp_path, kind):
    holder = subprocess.Popen(
        [PYTHON, "-c", "import sys, time, pathlib; sys.path.insert(0, sys.argv[2]); from test_hostile import _run_lock\n"
         "with _run_lock(sys.argv[3], pathlib.Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)",
         str(tmp_path), str(Path(__file__).parent), kind],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OSError, match="another process holds its lock"), _run_lock(kind, tmp_path):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with _run_lock(kind, tmp_path):  # no stale lock after kill -9
            pass
        if kind == "folder":
            assert list(tmp_path.iterdir()) == []  # and nothing left in the folder
    finally:
        holder.kill()
        holder.wait()


# --- text: undecodable input on standard input ---------------------------------------------------


def test_undecodable_standard_input_gets_the_sentence_a_file_gets(arena, subprocess_env, tmp_path):
    bad = b"ROMEO: \xff\xfe the king\n"
    (tmp_path / "bad.txt").write_bytes(bad)
    inspect = ["-m", "charrnn", "inspect", "--checkpoint", arena / "good", "--device", "cpu", "--out", tmp_path / "p.html"]
    escaped = {"PYTHONIOENCODING": "utf-8:surrogateescape"}  # what a C-locale terminal gives Python
    cases = {
        "inspect: a file": Case([*inspect, "--text", tmp_path / "bad.txt"], "is not UTF-8 text"),
        "inspect: stdin": Case([*inspect, "--text", "-"], "-: it is not UTF-8 text", stdin=bad),
        "inspect: stdin, surrogateescape": Case([*inspect, "--text", "-"], "-: it is not UTF-8 text", stdin=bad, env=escaped),
        "chat: stdin": Case(_chat(arena), "standard input: it is not UTF-8 text", stdin=bad + b"/quit\n"),
        "chat: stdin, surrogateescape": Case(_chat(arena), "it is not UTF-8 text", stdin=bad + b"/quit\n", env=escaped, code=0),
    }
    _run_class(cases, subprocess_env, tmp_path, [])


# --- token caches are checked against their vocabulary -------------------------------------------


def test_a_token_cache_with_a_flipped_byte_is_encoded_again(corpus_file, data_dir, capsys):
    tokens, tokenizer = corpus_tokens(str(corpus_file))
    expected = np.array(tokens)
    path = cache_folder(str(corpus_file), "train", None, [corpus_file]) / TOKENS_FILE
    del tokens
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff")  # an id far outside the 30-odd characters of the corpus
    again, _ = corpus_tokens(str(corpus_file))
    assert "damaged" in capsys.readouterr().err
    assert np.array_equal(np.array(again), expected)


if sys.platform == "win32":  # pragma: no cover
    pytestmark = pytest.mark.skip("FIFOs, device nodes and flock are POSIX")

"""The package as a user installs it: an sdist and a wheel built from a copy of the tracked files,
installed into a fresh virtual environment, and every command run from an empty folder.

This is the one test that proves the checkout is not needed: the kernel source, the chat
page and every module travel in the wheel, the console scripts work, runs land under the
current folder, and the installed package samples through its compiled kernel. It takes a
few minutes (a venv, torch's CPU wheel from the local index, one kernel build).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, make_text

DISTRIBUTION = "charrnn-lm"
INSTALL_TIMEOUT = 900  # seconds for pip to install torch and the dependencies from the local index
RUN_TIMEOUT = 300  # seconds for one command, a kernel build included
NEEDED_IN_WHEEL = ("charrnn/generation/csrc/step.cpp", "charrnn/serve/chat.html", "charrnn/cli/main.py", "charrnn/hub.py")


def _run(args, cwd, env=None, timeout=RUN_TIMEOUT, stdin=None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args[:3]} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def _tracked_copy(dest: Path) -> Path:
    """The tracked files of the checkout (what a release is made of), without its venv or builds."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        source = REPO / name.decode()
        if source.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A venv with the wheel (built from the sdist, as pip builds one) and its serve extra installed."""
    root = tmp_path_factory.mktemp("install")
    source = _tracked_copy(root / "source")
    dist = root / "dist"
    build = "from setuptools import build_meta as b; import sys; print(b.build_sdist(sys.argv[1]))"
    sdist = dist / _run([sys.executable, "-c", build, dist], source).stdout.split()[-1]
    with tarfile.open(sdist) as archive:
        archive.extractall(root / "unpacked", filter="data")
    unpacked = next((root / "unpacked").iterdir())
    build = "from setuptools import build_meta as b; import sys; print(b.build_wheel(sys.argv[1]))"
    wheel = dist / _run([sys.executable, "-c", build, dist], unpacked).stdout.split()[-1]
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv], root)
    python = venv / "bin" / "python"
    lock = REPO / "requirements.lock"
    # torch first, pinned: the CPU wheel, never a multi-GB CUDA build pulled in by a dependency.
    _run([python, "-m", "pip", "install", "--quiet", "torch==2.13.0", "-c", lock], root, timeout=INSTALL_TIMEOUT)
    _run([python, "-m", "pip", "install", "--quiet", f"{wheel}[serve]", "-c", lock], root, timeout=INSTALL_TIMEOUT)
    home = root / "home"
    env = {
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "TORCH_EXTENSIONS_DIR": str(home / "torch_extensions"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONIOENCODING": "utf-8",
    }
    return {"sdist": sdist, "wheel": wheel, "bin": venv / "bin", "python": python, "env": env, "root": root}


def test_the_sdist_and_the_wheel_carry_everything_run_time_needs(installed):
    with zipfile.ZipFile(installed["wheel"]) as wheel:
        names = set(wheel.namelist())
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        assert f"Name: {DISTRIBUTION}" in wheel.read(metadata).decode()
    assert set(NEEDED_IN_WHEEL) <= names
    with tarfile.open(installed["sdist"]) as archive:
        members = {m.name.split("/", 1)[1] for m in archive.getmembers() if "/" in m.name}
    assert set(NEEDED_IN_WHEEL) <= members and "requirements.lock" in members


def test_every_command_works_from_an_empty_folder_outside_the_checkout(installed):
    env, bin_ = installed["env"], installed["bin"]
    work = installed["root"] / "empty"
    work.mkdir()
    corpus = installed["root"] / "corpus.txt"
    corpus.write_text(make_text(5, 20_000), encoding="utf-8")
    charrnn = bin_ / "charrnn"

    trained = _run([charrnn, "train", "--data", corpus, "--max-time", "20", "--device", "cpu", "--no-plot"], work, env)
    run = next((work / "checkpoints").iterdir())  # runs land under the current folder
    assert (run / "best" / "config.json").is_file(), trained.stderr
    assert sorted(p.name for p in work.iterdir()) == ["checkpoints"]

    sampled = _run([charrnn, "sample", "--checkpoint", run, "--prompt", "ROMEO:", "--length", "50", "--seed", "1"], work, env)
    assert sampled.stdout.startswith("ROMEO:") and len(sampled.stdout) > 50
    scored = _run([charrnn, "score", "--checkpoint", run, "--json", corpus], work, env)
    assert json.loads(scored.stdout)
    chat = _run([charrnn, "chat", "--checkpoint", run, "--device", "cpu", "--seed", "1"], work, env, stdin="hello\n/quit\n")
    assert chat.stdout.strip()

    # The installed package samples through its compiled kernel (built here, from the wheel's source).
    probe = (
        "import charrnn; from charrnn.generation.native import load_kernel; import sys; "
        "s = charrnn.load(sys.argv[1], device='cpu'); assert load_kernel() is not None; "
        "print(type(s.stepper(1)).__name__, charrnn.__file__)"
    )
    stepper, where = _run([installed["python"], "-c", probe, run], work, env).stdout.split()
    assert stepper == "NativeStepper" and not Path(where).is_relative_to(REPO)

    serve = subprocess.Popen(
        [bin_ / "charrnn", "serve", "--checkpoint", run, "--port", "0", "--device", "cpu", "--quiet"],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = serve.stdout.readline()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=RUN_TIMEOUT) as answer:
            assert json.loads(answer.read())["status"] == "ok"
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(RUN_TIMEOUT) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
        serve.wait()
        serve.stdout.close()
        serve.stderr.close()

"""The terminal chat as a person uses it: in tmux, typing, arrow keys (send-keys), reading the screen (capture-pane)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time

import pytest
from conftest import PYTHON, REPO

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")


class Tmux:
    """One tmux server of our own (its own socket), one window running a command."""

    def __init__(self, socket: str, command: str, env: dict[str, str]):
        self.base = ["tmux", "-L", socket]
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        subprocess.run(
            [*self.base, "-f", "/dev/null", "new-session", "-d", "-x", "160", "-y", "50", f"env {exports} {command}; sleep 30"],
            check=True,
        )

    def keys(self, *keys: str, literal: bool = False) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "0", *(["-l"] if literal else []), *keys], check=True)

    def screen(self) -> str:
        return subprocess.run([*self.base, "capture-pane", "-p", "-t", "0"], capture_output=True, text=True, check=True).stdout

    def wait_for(self, check, what: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if check(screen):
                return screen
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; the screen:\n{screen}")
            time.sleep(0.1)

    def last_line(self) -> str:
        lines = [line for line in self.screen().splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


@pytest.fixture
def chat_in_tmux(trained_run, tmp_path):
    cache = tmp_path / "cache"
    env = {
        "XDG_CACHE_HOME": str(cache),
        "PYTHONPATH": str(REPO),
        "CHARRNN_KERNEL": "off",  # torch ops: nothing to compile in this process
        "HF_HUB_OFFLINE": "1",
        "TERM": "xterm",
    }
    command = f"{PYTHON} -m charrnn chat --checkpoint {shlex.quote(str(trained_run.best))} --seed 1 --length 30 --device cpu"
    sessions = []

    def start() -> Tmux:
        tmux = Tmux(f"charrnn-test-{os.getpid()}-{len(sessions)}", command, env)
        sessions.append(tmux)
        tmux.wait_for(lambda s: "charrnn chat:" in s and s.rstrip().endswith("ROMEO:"), "the greeting and the prompt")
        return tmux

    yield start, cache / "charrnn" / "chat_history"
    for tmux in sessions:
        tmux.close()


def _prompt_ready(count: int):
    """The screen once ``count`` prompts are shown and the last one is empty (a reply has ended)."""
    return lambda s: s.count("ROMEO:") >= count and s.rstrip().endswith("ROMEO:")


def test_arrow_keys_edit_and_recall_lines_and_history_outlives_the_chat(chat_in_tmux):
    start, history = chat_in_tmux
    tmux = start()
    tmux.keys("the cat sat", literal=True)
    tmux.keys("Enter")
    tmux.wait_for(_prompt_ready(2), "the first reply")
    assert "JULIET:" in tmux.screen()

    tmux.keys("Up")  # the line typed before comes back
    tmux.wait_for(lambda s: s.rstrip().endswith("ROMEO: the cat sat"), "the recalled line")
    tmux.keys("Left", "Left", "Left")  # before "sat"
    tmux.keys("big ", literal=True)
    tmux.keys("Home")
    tmux.keys("KING ", literal=True)  # typed at the start of the line
    screen = tmux.wait_for(lambda s: s.rstrip().endswith("ROMEO: KING the cat big sat"), "the edited line")
    tmux.keys("Enter")
    screen = tmux.wait_for(_prompt_ready(3), "the second reply")
    assert "ROMEO: KING the cat big sat" in screen

    tmux.keys("/quit", literal=True)
    tmux.keys("Enter")
    deadline = time.monotonic() + 30
    while not (history.exists() and "KING the cat big sat" in history.read_text()):
        assert time.monotonic() < deadline, "the history file was not written"
        time.sleep(0.1)
    assert history.read_text().splitlines()[-3:] == ["the cat sat", "KING the cat big sat", "/quit"]

    again = start()  # a new chat: Up reaches the lines of the last one
    again.keys("Up", "Up")
    again.wait_for(lambda s: s.rstrip().endswith("ROMEO: KING the cat big sat"), "a line from the previous chat")
    again.keys("Down")
    again.wait_for(lambda s: s.rstrip().endswith("ROMEO: /quit"), "the next line of the history")

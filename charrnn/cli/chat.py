"""``charrnn chat`` (also ``charrnn-chat``): chat with a trained model in the terminal.

The transcript (your lines, echoed when piped, and the replies) goes to stdout; the
greeting, /command answers, warnings and errors to stderr. A bad line or command gets
one ``error:`` line and the chat goes on.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import read_text_file, user_cache_dir
from ..config import SampleConfig
from ..errors import CharRNNError, ConfigError
from ..generation.chat import ChatSession, ChatTemplate
from ..generation.sampler import MAX_PROMPT_CHARS, load
from .options import (
    add_fields,
    add_runtime_options,
    add_template_options,
    new_parser,
    pick,
    run_cli,
    template_from,
    unescape,
)

HELP = "chat with a trained model in the terminal"

COMMANDS = """commands:
  /reset        forget the conversation
  /temp T       sampling temperature from now on (0: greedy)
  /save FILE    save the conversation to FILE
  /load FILE    resume a conversation saved with /save
  /help         this list
  /quit         leave (so does end of input, Ctrl-D)"""


def build_parser(prog: str = "charrnn-chat") -> argparse.ArgumentParser:
    parser = new_parser(
        prog,
        "Chat with a trained charrnn model in the terminal; replies stream as they are written. "
        "Type /help in the chat for its commands.",
    )
    add_runtime_options(parser)
    # Log-probabilities are for reading, in sample's JSON lines or the server's answers: a chat shows text.
    add_fields(parser, SampleConfig, "replies (length: the most characters of one)", skip=("logprobs",))
    add_template_options(parser, "chat template (how the conversation is written into the text the model reads)")
    parser.add_argument(
        "--stop", action="append", default=[], help="a reply ends at this string (repeatable; default: the separator)"
    )
    parser.add_argument("--preamble", default="", help="text read before the conversation (a 'system' text)")
    parser.add_argument("--preamble-file", default=None, help="read the preamble from this UTF-8 file")
    return parser


def _label(prefix: str, fallback: str) -> str:
    return prefix.strip() or fallback


HISTORY_FILE = "chat_history"
HISTORY_LENGTH = 1000


class LineEditing:
    """Arrow keys, line editing and a history kept between chats, for ``input()`` on a terminal.

    The standard library's ``readline`` (GNU readline or libedit) does the editing once it
    is imported; this loads the history from the user's cache folder
    (``~/.cache/charrnn/chat_history`` on Linux) and writes it back when the chat ends. Piped input
    and platforms without ``readline`` get plain ``input()``.
    """

    def __init__(self, path: Path | None = None):
        self.path = path or user_cache_dir() / HISTORY_FILE
        self.readline: Any = None
        if not sys.stdin.isatty():
            return
        try:
            import readline
        except ImportError:  # e.g. Windows without pyreadline: typing still works, without history
            return
        self.readline = readline
        readline.set_history_length(HISTORY_LENGTH)
        try:
            readline.read_history_file(self.path)
        except OSError:  # no history yet, or an unreadable one: start afresh
            pass

    def save(self) -> None:
        if self.readline is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(self.path)
        except OSError as exc:  # a history is a convenience: say so, never fail the chat's end
            print(f"note: chat history not saved to {self.path}: {exc.strerror or exc}", file=sys.stderr)


class Terminal:
    """The chat loop's input and output: a transcript on stdout, everything else on stderr."""

    def __init__(self, session: ChatSession):
        self.session = session
        self.echo = not sys.stdin.isatty()  # piped input: echo it, so stdout reads as a transcript
        self.editing = LineEditing()

    def say(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def read_line(self) -> str | None:
        template = self.session.template or ChatTemplate()
        try:
            line = input(_label(template.user_prefix, "you>") + " ")
        except EOFError:
            print(flush=True)
            return None
        except UnicodeDecodeError:  # the rest of the stream cannot be trusted to line up: end, as a file would
            raise ConfigError("cannot read standard input: it is not UTF-8 text") from None
        if self.echo:
            print(line, flush=True)
        return line

    def reply(self, message: str) -> None:
        template = self.session.template or ChatTemplate()
        out = sys.stdout
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pieces = self.session.stream(message)
            try:
                first = next(pieces, "")  # reads the message: a refused one prints no reply label
            finally:
                for w in caught:
                    self.say(f"warning: {w.message}")
        out.write(_label(template.bot_prefix, "bot>") + " " + first)
        out.flush()
        try:
            for piece in pieces:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:  # Ctrl-C ends the reply, not the chat
            pieces.close()
            self.say("\n(reply interrupted)")
        out.write("\n")
        out.flush()

    def command(self, line: str) -> bool:
        """Run a /command; False when the chat should end."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.say(COMMANDS)
        elif name == "/reset":
            self.session.reset()
            self.say("(conversation reset)")
        elif name == "/temp":
            try:
                value = float(arg)
            except ValueError:
                raise ConfigError(f"/temp needs a number, e.g. /temp 0.7 (got {arg!r})") from None
            self.session.configure(temperature=value)
            self.say(f"(temperature {value:g})")
        elif name in ("/save", "/load"):
            if not arg:
                raise ConfigError(f"{name} needs a file name, e.g. {name} chat.session")
            if name == "/save":
                self.say(f"(saved to {self.session.save(arg)})")
            else:
                self.session = ChatSession.load(self.session.sampler, arg)
                self.say(f"(loaded {arg}: {self.session.turns} turns so far)")
        else:
            raise ConfigError(f"unknown command {name}: type /help for the list")
        return True

    def loop(self) -> None:
        try:
            self._loop()
        finally:
            self.editing.save()

    def _loop(self) -> None:
        while True:
            line = self.read_line()
            if line is None:
                return
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return
                else:
                    self.reply(line)
            except CharRNNError as exc:  # a bad line or command: say why and go on
                self.say(f"error: {exc}")


def run(argv: list[str], prog: str = "charrnn-chat") -> int:
    args = build_parser(prog).parse_args(argv)
    template = template_from(args)
    preamble = unescape(args.preamble)
    if args.preamble_file:
        preamble = read_text_file(args.preamble_file, f"--preamble-file {args.preamble_file}", MAX_PROMPT_CHARS, ConfigError)
    config = pick(SampleConfig, {**vars(args), "stop": tuple(unescape(s) for s in args.stop)})  # checked before the model load
    options = {k: v for k, v in vars(config).items() if k != "seed" and (k != "stop" or args.stop)}
    sampler = load(args.checkpoint, device=args.device, dtype=args.precision)
    terminal = Terminal(ChatSession(sampler, args.seed, template=template, preamble=preamble, **options))
    terminal.say(
        f"charrnn chat: you write as {_label(template.user_prefix, 'the user')!r}, the model answers as "
        f"{_label(template.bot_prefix, 'the bot')!r}. /help lists the commands; /quit leaves."
    )
    terminal.loop()
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "charrnn-chat") -> int:
    """Entry point of ``charrnn-chat`` / ``charrnn chat``: user mistakes exit 2, Ctrl-C 130."""
    return run_cli(lambda args: run(args, prog), argv)

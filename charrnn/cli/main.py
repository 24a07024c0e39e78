"""``charrnn COMMAND ...``: one command with a subcommand per job (``python -m charrnn`` too)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from .._version import __version__
from . import chat, export, inspect, plot, push, sample, score, serve, train
from .options import EXIT_USER_ERROR, HelpFormatter

COMMANDS: dict[str, ModuleType] = {
    "train": train,
    "sample": sample,
    "chat": chat,
    "serve": serve,
    "inspect": inspect,
    "plot": plot,
    "score": score,
    "export": export,
    "push": push,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="charrnn",
        description="Character-level RNN language models: train, sample, chat, serve, inspect, plot, score, export, push.",
        formatter_class=HelpFormatter,
        epilog="Run 'charrnn COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"charrnn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, module in COMMANDS.items():
        commands.add_parser(name, help=module.HELP, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``charrnn`` / ``python -m charrnn``: hands the rest of the line to the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]].main(argv[1:], prog=f"charrnn {argv[0]}")
    parser = _parser()
    if not argv:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    parser.parse_args(argv)  # --help, --version, or an unknown command: argparse answers and exits
    return EXIT_USER_ERROR

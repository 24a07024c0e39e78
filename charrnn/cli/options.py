"""The toolkit every ``charrnn`` command shares: flags from config fields, common options, error handling.

Flags come from the config dataclasses' fields (``--kebab-case``, help from each
field's metadata), so the library and the CLI never drift apart.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import signal
import sys
import traceback
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..checkpoint import find_latest_checkpoint
from ..config import DEVICES
from ..errors import CharRNNError, ConfigError
from ..generation.chat import ChatTemplate
from ..generation.sampler import PRECISIONS

EXIT_USER_ERROR = 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default in ("", []):
            return action.help
        return super()._get_help_string(action)


def _parser_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A config's own parser as an argparse type: its ConfigError becomes argparse's usage error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


class _Repeated(argparse.Action):
    """A flag that may be given several times: the list of its values, in place of its default."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None) -> None:
        given = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, [*given, values] if isinstance(given, list) else [values])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_fields(parser: argparse.ArgumentParser, cls: type, title: str, skip: Sequence[str] = (), defaults: bool = True) -> None:
    """One flag per dataclass field (but those in ``skip``); the default is shown by the HelpFormatter.

    With ``defaults=False`` every flag's default is ``argparse.SUPPRESS``, so a parse
    holds only the flags that were typed (see :func:`typed_flags`).
    """
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True) or f.name in skip:
            continue
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # "int | None" -> int
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": f.default if defaults else argparse.SUPPRESS}
        if f.metadata.get("auto"):
            kwargs["type"] = _auto_or(kind)
            kwargs["metavar"] = f"{kind.__name__.upper()}|auto"
            kwargs["help"] += " (default: auto)"
        elif "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.metadata.get("repeat"):
            kwargs["action"], kwargs["type"] = _Repeated, kind
        elif "parse" in f.metadata:
            kwargs["type"] = _parser_type(f.metadata["parse"])
        elif "type" not in kwargs:
            kwargs["type"] = kind
        group.add_argument(_flag(f.name), **kwargs)


@contextlib.contextmanager
def fields_as_flags(*classes: type) -> Iterator[None]:
    """Report the errors of the configs ``classes`` raised inside with their flags.

    A config's own checks name its fields, as a library caller writes them (``hidden_size
    must be at least 1``); the command line names the flag the user typed (``--hidden-size
    must be at least 1``). Other ConfigErrors (a run directory, a device) pass as they are.
    """
    modules = {cls.__module__ for cls in classes}
    names = sorted({f.name for cls in classes for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}, key=len)
    field = re.compile(r"(?<![\w.'\"-])(" + "|".join(reversed(names)) + r")(?![\w'\"-])")  # whole names, not values
    try:
        yield
    except ConfigError as exc:
        frames = list(traceback.walk_tb(exc.__traceback__))
        if not frames or frames[-1][0].f_globals.get("__name__") not in modules:
            raise
        raise ConfigError(field.sub(lambda m: _flag(m.group(1)), str(exc))) from None


def _auto_or(kind: type) -> Callable[[str], Any]:
    """An argparse type for a setting the budget may choose: 'auto' gives None, anything else ``kind``."""

    def parse(text: str) -> Any:
        return None if text == "auto" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def typed_flags(build: Callable[[bool], argparse.ArgumentParser], argv: Sequence[str]) -> set[str]:
    """The destinations of the flags the user typed, however spelled (``--max-t`` for ``--max-time``).

    ``build(defaults)`` makes the command's parser; it is built again with every default
    suppressed and parsed again, so argparse itself, which resolved the abbreviations
    and ``--flag=value`` forms of the real parse, says what was typed.
    """
    return set(vars(build(False).parse_args(argv)))


def pick(cls: type, values: dict[str, Any]) -> Any:
    """An instance of the dataclass ``cls`` from the values of its fields in ``values``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None
) -> None:
    print(f"warning: {message}", file=sys.stderr)


def run_cli(main: Callable[[list[str]], int], argv: Sequence[str] | None) -> int:
    """Run a front end: user mistakes print one line and exit 2, Ctrl-C exits 130, a closed
    output pipe exits 141 without a word."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # "warning: ..." lines, not source lines
            return main(list(sys.argv[1:] if argv is None else argv))
    except CharRNNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_USER_ERROR)  # 1 where it was not the user's mistake
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 128 + signal.SIGPIPE


def add_checkpoint_option(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, shared by the commands that load a model."""
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint or run directory, or hf:OWNER/NAME[@REVISION] on the Hugging Face Hub (default: newest best under checkpoints/)",
    )


def chosen_checkpoint(args: argparse.Namespace) -> str | Path:
    """The checkpoint ``--checkpoint`` names, or the newest best under ``checkpoints/``."""
    return args.checkpoint if args.checkpoint is not None else find_latest_checkpoint()


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where to run")


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --device and --precision, shared by the commands that sample."""
    add_checkpoint_option(parser)
    add_device_option(parser)
    parser.add_argument(
        "--precision",
        default="auto",
        choices=tuple(PRECISIONS),
        help="weights of a sampling step: auto takes int8 for one stream on a CPU and bfloat16 for batches "
        "where the hardware has it; float32 is exact",
    )


def unescape(text: str) -> str:
    r"""Read ``\n``, ``\t`` and ``\\`` in a command-line value (other backslashes stay as typed)."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def escape(text: str) -> str:
    r"""The inverse of :func:`unescape`: a text as a command line writes it (newlines as ``\n``), for ``--help``."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


TEMPLATE_FLAGS = {"user_prefix": "--user-prefix", "bot_prefix": "--bot-prefix", "turn_separator": "--separator"}


def add_template_options(parser: argparse.ArgumentParser, title: str) -> None:
    """--user-prefix, --bot-prefix and --separator, from the :class:`ChatTemplate` fields (default, help)."""
    group = parser.add_argument_group(title, "\\n means a newline and \\t a tab")
    template = {f.name: f for f in dataclasses.fields(ChatTemplate)}
    for name, flag in TEMPLATE_FLAGS.items():
        group.add_argument(
            flag,
            dest=name,
            metavar=flag[2:].upper(),
            default=escape(template[name].default),
            help=template[name].metadata["help"],
        )


def template_from(args: argparse.Namespace) -> ChatTemplate:
    """The chat template that the template options give."""
    return ChatTemplate(**{name: unescape(getattr(args, name)) for name in TEMPLATE_FLAGS})


def new_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A command's parser, with the shared help format."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)

"""Command-line front ends: parse flags into configs, call the library, report errors.

Flags come from the config dataclasses' fields (``--kebab-case``, help from each
field's metadata), so the library and the CLI never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import signal
import sys
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from .config import ModelConfig, SampleConfig, TrainConfig
from .errors import CharRNNError
from .tokenizer import is_surrogate

EXIT_USER_ERROR = 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default in ("", []):
            return action.help
        return super()._get_help_string(action)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_fields(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One flag per dataclass field; the default is shown by ArgumentDefaultsHelpFormatter."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # "int | None" -> int
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": f.default}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
        group.add_argument(_flag(f.name), **kwargs)


def _explicit(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Names of the options the user actually typed (not left at their defaults)."""
    given = set()
    for action in parser._actions:
        if any(arg == opt or arg.startswith(opt + "=") for opt in action.option_strings for arg in argv):
            given.add(action.dest)
    return given


def _pick(cls: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None) -> None:
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
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 128 + signal.SIGPIPE


# --- charrnn-train -------------------------------------------------------------------------


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a character-level RNN language model.",
        formatter_class=HelpFormatter,
        epilog="Example: python train.py --data shakespeare   (then: python sample.py --prompt 'ROMEO:')",
    )
    _add_fields(parser, TrainConfig, "data and training")
    _add_fields(parser, ModelConfig, "model")
    return parser


def _train_main(argv: list[str]) -> int:
    from .training.trainer import train

    parser = train_parser()
    args = vars(parser.parse_args(argv))
    result = train(_pick(TrainConfig, args), _pick(ModelConfig, args), explicit=_explicit(parser, argv))
    return 128 + result.signal if result.signal else 0


def train_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``train.py`` / ``charrnn-train``."""
    return run_cli(_train_main, argv)


# --- charrnn-sample ------------------------------------------------------------------------


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """--device and --precision, shared by the commands that sample."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="where to run")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "float32", "bfloat16", "int8"),
        help="weights of a sampling step: auto takes int8 for one stream on a CPU and bfloat16 for batches "
        "where the hardware has it; float32 is exact",
    )


def sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sample.py",
        description="Generate text from a trained charrnn checkpoint; it streams as it is written.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--checkpoint", default=None, help="checkpoint or run directory (default: newest best under checkpoints/)")
    parser.add_argument("--prompt", default="", help="text to start from (printed, then continued)")
    parser.add_argument("--greedy", action="store_true", help="always take the likeliest character (temperature 0)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples to generate side by side")
    parser.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    add_runtime_options(parser)
    _add_fields(parser, SampleConfig, "sampling")
    return parser


def _sample_main(argv: list[str]) -> int:
    from .sampling import load

    args = sample_parser().parse_args(argv)
    # Bytes of the command line that are not UTF-8 reach Python as lone surrogates, which no
    # stream can print: they become U+FFFD, as the model reads them (as <unk>) anyway.
    args.prompt = "".join("\ufffd" if is_surrogate(ch) else ch for ch in args.prompt)
    options = dict(
        length=args.length,
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    SampleConfig(**options)  # check the options before the (slower) model load
    sampler = load(args.checkpoint, device=args.device, dtype=args.precision)
    out = sys.stdout
    if args.num_samples == 1:
        pieces = sampler.stream(args.prompt, **options)
        first = next(pieces, "")  # reads (and checks) the prompt: a refused prompt prints nothing
        out.write(args.prompt)
        for piece in itertools.chain((first,), pieces):
            out.write(piece)
            out.flush()
        out.write("\n")
    else:
        for i, text in enumerate(sampler.generate_many(args.prompt, args.num_samples, **options)):
            out.write(f"--- sample {i + 1} ---\n{args.prompt}{text}\n")
    out.flush()
    return 0


def sample_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sample.py`` / ``charrnn-sample``."""
    return run_cli(_sample_main, argv)

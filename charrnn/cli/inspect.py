"""``charrnn inspect`` (also ``charrnn-inspect``): the hidden-state page of a text."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .._io import atomic_write, read_text_file
from ..checkpoint import load_checkpoint
from ..device import resolve_device
from ..errors import ConfigError, PromptError
from ..inspector import DEFAULT_TOP, MAX_TEXT_CHARS, compile_pattern, inspect_text, render_html
from .options import add_checkpoint_option, add_device_option, chosen_checkpoint, new_parser, run_cli

HELP = "colour a text by the hidden state of chosen units (an HTML page)"


def _units(value: str) -> list[int]:
    try:
        return [int(v) for v in value.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a list of unit numbers") from None


def build_parser(prog: str = "charrnn-inspect") -> argparse.ArgumentParser:
    parser = new_parser(
        prog,
        "Colour each character of a text by the state of chosen hidden units, as an HTML page "
        "(self-contained: inline CSS, no script). Blue is negative, red positive.",
        "Example: charrnn inspect --checkpoint checkpoints/RUN --text play.txt --pattern '(?m)^[A-Z][^\\n]*:$' "
        "--top 4 --out inspect.html",
    )
    add_checkpoint_option(parser)
    parser.add_argument(
        "--text", required=True, help=f"UTF-8 text file to read, at most {MAX_TEXT_CHARS:,} characters ('-': stdin)"
    )
    parser.add_argument("--out", default="inspect.html", help="HTML file to write")
    parser.add_argument(
        "--state", default="auto", choices=("auto", "h", "c"),
        help="which state to show: c (LSTM cell state, coloured by tanh c) or h (hidden output); auto is c for LSTM, h otherwise",
    )  # fmt: skip
    parser.add_argument(
        "--layer",
        default=None,
        help="layer to look into, 0 = first, -1 = last; 'all' ranks every layer's units (default: the last)",
    )
    parser.add_argument("--units", type=_units, nargs="+", action="extend", default=None,
                        help="unit numbers to show, e.g. --units 3 41 or --units 3,41")  # fmt: skip
    parser.add_argument(
        "--pattern", default=None, help="regex: rank units by how well they follow 'inside a match', e.g. '\"[^\"]*\"'"
    )
    parser.add_argument(
        "--top", type=int, default=DEFAULT_TOP, help="units to show when ranking (by --pattern, else by variance)"
    )
    add_device_option(parser)
    return parser


def run(argv: list[str], prog: str = "charrnn-inspect") -> int:
    args = build_parser(prog).parse_args(argv)
    units = None if args.units is None else [u for group in args.units for u in group]
    text = read_text_file(args.text, f"--text {args.text}", MAX_TEXT_CHARS, PromptError, stdin=sys.stdin)
    if len(text) > MAX_TEXT_CHARS:
        raise PromptError(
            f"--text {args.text} has more than {MAX_TEXT_CHARS:,} characters (the page holds one coloured copy of it "
            "per unit): pass an excerpt"
        )
    if args.pattern is not None:
        compile_pattern(args.pattern)  # a typo fails before the model loads
    device = resolve_device(args.device)
    if device.type == "cpu":
        # One character after another at batch 1: each step is a small matrix-vector
        # product, where a second thread only adds waiting (10-30x slower on a busy machine).
        torch.set_num_threads(1)
    ckpt = load_checkpoint(chosen_checkpoint(args), device)
    result = inspect_text(
        ckpt.model, ckpt.tokenizer, text, units=units, pattern=args.pattern, top=args.top,
        layer=args.layer, state=args.state,
    )  # fmt: skip
    unknown = ckpt.tokenizer.unknown_chars(text)
    if unknown:
        print(f"note: {ckpt.tokenizer.unknown_note(unknown)}", file=sys.stderr)
    page = render_html(result, source=str(ckpt.path))
    out = Path(args.out).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out, "w", encoding="utf-8") as f:  # a failed write leaves an existing page as it was
            f.write(page)
    except OSError as exc:
        raise ConfigError(f"cannot write --out {out}: {exc.strerror or exc}") from None
    for view in result.units:
        score = f"r = {view.r:+.3f}" if view.r is not None else f"std {view.spread:.3f}"
        print(f"{view.label}: {score}")
    print(f"wrote {out} ({len(result.units)} unit(s) × {len(text):,} characters, state {result.state}); open it in a browser")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "charrnn-inspect") -> int:
    """Entry point of ``charrnn-inspect`` / ``charrnn inspect``."""
    return run_cli(lambda args: run(args, prog), argv)

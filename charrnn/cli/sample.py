"""``charrnn sample`` (also ``sample.py``, ``charrnn-sample``): text from a trained model, streamed as it is written."""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence

from .._io import read_text_file
from ..config import SampleConfig
from ..errors import PromptError
from ..generation.sampler import MAX_PROMPT_CHARS, load
from ..tokenizer import is_surrogate
from .options import add_fields, add_runtime_options, new_parser, pick, run_cli

HELP = "generate text from a trained model"


def build_parser(prog: str = "sample.py") -> argparse.ArgumentParser:
    parser = new_parser(prog, "Generate text from a trained charrnn checkpoint; it streams as it is written.")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to start from (printed, then continued); - reads it from stdin")
    prompt.add_argument(
        "--prompt-file", default=None, help=f"start from the text of this UTF-8 file (at most {MAX_PROMPT_CHARS:,} characters)"
    )
    parser.add_argument("--greedy", action="store_true", help="always take the likeliest character (temperature 0)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples to generate side by side")
    parser.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    add_runtime_options(parser)
    add_fields(parser, SampleConfig, "sampling")
    return parser


def run(argv: list[str], prog: str = "sample.py") -> int:
    args = build_parser(prog).parse_args(argv)
    # Bytes of the command line that are not UTF-8 reach Python as lone surrogates, which no
    # stream can print: they become U+FFFD, as the model reads them (as <unk>) anyway.
    prompt = "".join("\ufffd" if is_surrogate(ch) else ch for ch in args.prompt)
    source = args.prompt_file or ("-" if args.prompt == "-" else None)
    if source is not None:  # long and multi-line primes, from a file or standard input
        what = "--prompt - (standard input)" if source == "-" else f"--prompt-file {source}"
        prompt = read_text_file(source, what, MAX_PROMPT_CHARS, PromptError, stdin=sys.stdin)
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PromptError(
                f"{what} has more than {MAX_PROMPT_CHARS:,} characters; a char-RNN remembers far less: pass the last part of it"
            )
    config = pick(  # checked before the (slower) model load
        SampleConfig, {**vars(args), "temperature": 0.0 if args.greedy else args.temperature, "stop": tuple(args.stop)}
    )
    sampler = load(args.checkpoint, device=args.device, dtype=args.precision)
    out = sys.stdout
    if args.num_samples == 1:
        pieces = sampler.continue_from(sampler.read(prompt), config, keep_context=False)  # reads (and checks) the prompt
        first = next(pieces, "")  # a refused prompt prints nothing
        out.write(prompt)
        for piece in itertools.chain((first,), pieces):
            out.write(piece)
            out.flush()
        out.write("\n")
    else:
        for i, text in enumerate(sampler.generate_many(prompt, args.num_samples, **vars(config))):
            out.write(f"--- sample {i + 1} ---\n{prompt}{text}\n")
    out.flush()
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "sample.py") -> int:
    """Entry point of ``sample.py`` / ``charrnn-sample`` / ``charrnn sample``."""
    return run_cli(lambda args: run(args, prog), argv)

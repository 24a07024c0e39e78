"""``charrnn sample`` (also ``sample.py``, ``charrnn-sample``): text from a trained model, streamed as it is written."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Sequence

from .._io import read_text_file
from ..config import MAX_SCHEMA_CHARS, SampleConfig
from ..errors import ConfigError, PromptError
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
    parser.add_argument(
        "--choice", action="append", default=[], dest="choices", help="the text must be one of these strings (repeatable)"
    )
    parser.add_argument("--json-schema", metavar="FILE", help="the text must be JSON that fits the JSON schema in this file")
    parser.add_argument(
        "--beam", type=int, metavar="N", help="beam search: the N likeliest continuations found, with their log-probabilities"
    )
    parser.add_argument(
        "--color", action="store_true", help="color each generated character by its probability (green: likely, red: not)"
    )
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
    schema = None
    if args.json_schema:  # too long a schema is named by SampleConfig, from the one character over
        schema = read_text_file(args.json_schema, f"--json-schema {args.json_schema}", MAX_SCHEMA_CHARS, ConfigError)
    values = {**vars(args), "temperature": 0.0 if args.greedy else args.temperature, "stop": tuple(args.stop)}
    if args.color and args.logprobs is None:
        values["logprobs"] = 0  # the colors are the characters' probabilities
    config = pick(SampleConfig, {**values, "choices": tuple(args.choices), "json_schema": schema})  # before the (slower) load
    if args.beam is not None and (args.num_samples != 1 or config.controlled or config.stop):
        raise ConfigError("--beam searches on its own: leave out --num-samples, --stop, the penalties and the constraints")
    sampler = load(args.checkpoint, device=args.device, dtype=args.precision)
    out = sys.stdout
    if args.beam is not None:
        for i, found in enumerate(sampler.beam_search(prompt, args.beam, config.length)):
            out.write(f"--- beam {i + 1}: log-probability {found.logprob:.4f} ---\n{prompt}{found.text}\n")
    elif args.logprobs is not None and not args.color:
        reply = sampler.continue_from(sampler.read(prompt), config, keep_context=False)
        for _ in reply:
            pass
        for record in reply.logprobs:
            top = [{"char": ch, "logprob": round(lp, 6)} for ch, lp in record.top]
            out.write(json.dumps({"char": record.char, "logprob": round(record.logprob, 6), "top": top}) + "\n")
    elif args.num_samples == 1:
        pieces = sampler.continue_from(sampler.read(prompt), config, keep_context=False)  # reads (and checks) the prompt
        first = next(pieces, "")  # a refused prompt prints nothing
        out.write(prompt)
        shown = 0
        for piece in itertools.chain((first,), pieces):
            if args.color:
                records, shown = pieces.logprobs[shown:], len(pieces.logprobs)
                piece = "".join(_colored(r.char, r.logprob) for r in records)
            out.write(piece)
            out.flush()
        out.write("\n")
    else:
        for i, text in enumerate(sampler.generate_many(prompt, args.num_samples, **vars(config))):
            out.write(f"--- sample {i + 1} ---\n{prompt}{text}\n")
    out.flush()
    return 0


# (lowest probability, ANSI color): red below 10%, yellow below 50%, green from there on.
_COLORS = ((0.5, "32"), (0.1, "33"), (0.0, "31"))


def _colored(char: str, logprob: float) -> str:
    """``char`` in the terminal color of its probability (a newline stays plain, so lines stay lines)."""
    if char == "\n":
        return char
    color = next(code for low, code in _COLORS if math.exp(logprob) >= low)
    return f"\x1b[{color}m{char}\x1b[0m"


def main(argv: Sequence[str] | None = None, prog: str = "sample.py") -> int:
    """Entry point of ``sample.py`` / ``charrnn-sample`` / ``charrnn sample``."""
    return run_cli(lambda args: run(args, prog), argv)

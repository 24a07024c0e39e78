"""``charrnn score``: a model's loss on a text, static and (with --dynamic) dynamic evaluation."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .._io import read_text_file
from ..checkpoint import find_latest_checkpoint, load_checkpoint
from ..data.corpus import load_corpus
from ..data.streams import TRAIN_FRACTION
from ..device import resolve_device
from ..errors import CorpusError
from ..evaluation import DYNAMIC_LR, LN2
from ..generation.sampler import Sampler
from .options import add_checkpoint_option, add_device_option, new_parser, run_cli

HELP = "measure a model's loss on its validation split or a text, optionally with dynamic evaluation"
MAX_TEXT_CHARS = 50_000_000


def build_parser(prog: str = "charrnn score") -> argparse.ArgumentParser:
    parser = new_parser(
        prog,
        "Mean nats per character (bits beside) of a model on a text: by default the validation split (last 10%) "
        "of the corpus it was trained on, read as one stream.",
        "Example: charrnn score --checkpoint checkpoints/RUN --dynamic",
    )
    add_checkpoint_option(parser)
    add_device_option(parser)
    parser.add_argument("--text-file", default=None, help="UTF-8 text to score, or - for stdin (default: the validation split)")
    parser.add_argument(
        "--dynamic",
        action="store_true",
        help="also score with dynamic evaluation: a copy of the weights keeps learning from the text as it reads it, "
        "each segment scored before it is learnt from",
    )
    parser.add_argument("--dynamic-lr", type=float, default=DYNAMIC_LR, help="SGD step of dynamic evaluation")
    return parser


def run(argv: list[str], prog: str = "charrnn score") -> int:
    args = build_parser(prog).parse_args(argv)
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint if args.checkpoint is not None else find_latest_checkpoint(), device)
    if args.text_file is not None:
        text, what = read_text_file(args.text_file, f"--text-file {args.text_file}", MAX_TEXT_CHARS, CorpusError), args.text_file
        if len(text) > MAX_TEXT_CHARS:
            raise CorpusError(f"--text-file {args.text_file} is over {MAX_TEXT_CHARS:,} characters: score a part of it")
    else:
        train = ckpt.meta.get("train", {})
        corpus = load_corpus(train.get("data", "shakespeare"), train.get("hf_split", "train"), train.get("hf_column"))
        text, what = corpus[int(len(corpus) * TRAIN_FRACTION) :], f"the validation split of {train.get('data')!r}"
    sampler = Sampler(ckpt.model, ckpt.tokenizer, device, max_prompt_chars=max(len(text), 1), kernel=False)
    static = sampler.score(text)
    print(f"{what}: {len(text):,} chars, {static:.4f} nats/char ({static / LN2:.3f} bpc)")
    if args.dynamic:
        dynamic = sampler.score(text, dynamic=True, dynamic_lr=args.dynamic_lr)
        print(f"  dynamic evaluation (lr {args.dynamic_lr:g}): {dynamic:.4f} nats/char ({dynamic / LN2:.3f} bpc)")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "charrnn score") -> int:
    """Entry point of ``charrnn score``."""
    return run_cli(lambda args: run(args, prog), argv)

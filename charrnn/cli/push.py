"""``charrnn push RUN OWNER/NAME``: a run's best checkpoint and a model card, to the Hugging Face Hub."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..share.publish import SAMPLE_LENGTH, push_to_hub
from .options import new_parser, run_cli, unescape

HELP = "upload a run's best checkpoint with a model card to the Hugging Face Hub"


def build_parser(prog: str = "charrnn push") -> argparse.ArgumentParser:
    parser = new_parser(
        prog,
        "Upload a run's best checkpoint to a Hugging Face Hub model repository, with a generated model card "
        "(README.md: metadata, validation loss, training time, a sample). The repository is private unless --public.",
        "Example: charrnn push checkpoints/RUN me/shakespeare-lstm   (then: charrnn sample --checkpoint hf:me/shakespeare-lstm). "
        "Log in first with `hf auth login`, or set HF_TOKEN.",
    )
    parser.add_argument("run", metavar="RUN", help="a run folder (its best/ is uploaded) or a checkpoint folder")
    parser.add_argument("repo_id", metavar="OWNER/NAME", help="the Hub model repository, created if it does not exist")
    parser.add_argument("--public", action="store_true", help="make a new repository public (default: private)")
    parser.add_argument("--sample-prompt", default="\\n", help="the model card's sample starts from this (\\n: a newline)")
    parser.add_argument("--sample-length", type=int, default=SAMPLE_LENGTH, help="characters of the model card's sample")
    parser.add_argument("--seed", type=int, default=1, help="seed of the model card's sample")
    parser.add_argument("--message", default=None, help="the commit message")
    return parser


def run(argv: list[str], prog: str = "charrnn push") -> int:
    args = build_parser(prog).parse_args(argv)
    result = push_to_hub(
        args.run,
        args.repo_id,
        private=not args.public,
        prompt=unescape(args.sample_prompt),
        sample_length=args.sample_length,
        seed=args.seed,
        message=args.message,
    )
    print(f"pushed to {result.repo_id} ({'private' if result.private else 'public'} where new): {result.commit_url}")
    print(f'  sample:  charrnn sample --checkpoint hf:{result.repo_id} --prompt "ROMEO:"')
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "charrnn push") -> int:
    """Entry point of ``charrnn push``."""
    return run_cli(lambda args: run(args, prog), argv)

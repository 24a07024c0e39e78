"""``charrnn export --onnx RUN``: a model's one-character step as ONNX, to run it outside Python."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..errors import ConfigError
from ..share.onnx import default_export_folder, export_onnx
from .options import new_parser, run_cli

HELP = "export a model's one-character step to ONNX, with its vocabulary"


def build_parser(prog: str = "charrnn export") -> argparse.ArgumentParser:
    parser = new_parser(
        prog,
        "Export a trained model to run outside Python: its one-character step (token and state in, logits and "
        "state out) as ONNX, with vocab.json and tokenizer.json beside it.",
        "Example: charrnn export --onnx checkpoints/RUN   (writes checkpoints/RUN/onnx/model.onnx)",
    )
    parser.add_argument("run", metavar="RUN", help="a run folder, its best/last checkpoint, or hf:OWNER/NAME")
    parser.add_argument("--onnx", action="store_true", help="export to ONNX (the one format so far)")
    parser.add_argument("--out", default=None, help="folder to write (default: RUN/onnx)")
    return parser


def run(argv: list[str], prog: str = "charrnn export") -> int:
    args = build_parser(prog).parse_args(argv)
    if not args.onnx:
        raise ConfigError("choose a format: --onnx (the one format charrnn exports to)")
    result = export_onnx(args.run, args.out or default_export_folder(args.run))
    print(f"wrote {result.onnx} and {result.vocab}")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "charrnn export") -> int:
    """Entry point of ``charrnn export``."""
    return run_cli(lambda args: run(args, prog), argv)

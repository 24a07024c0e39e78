"""``charrnn plot`` (also ``charrnn-plot``): a training run's loss curves as a PNG."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..errors import CharRNNError
from ..training.plot import METRICS_FILE, PLOT_FILE, plot_run
from .options import new_parser, run_cli

HELP = "draw a training run's loss curves"


def build_parser(prog: str = "charrnn-plot") -> argparse.ArgumentParser:
    parser = new_parser(
        prog,
        f"Draw a training run's loss against steps and against time, as a PNG, from its {METRICS_FILE}.",
        "Example: charrnn plot checkpoints/RUN   (writes checkpoints/RUN/training.png)",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help=f"a training run's folder (the one holding {METRICS_FILE})")
    parser.add_argument("--out", default=None, help=f"PNG file to write (default: RUN_DIR/{PLOT_FILE})")
    return parser


def run(argv: list[str], prog: str = "charrnn-plot") -> int:
    args = build_parser(prog).parse_args(argv)
    out = plot_run(args.run_dir, args.out)
    if out is None:
        raise CharRNNError("matplotlib is not installed: pip install 'charrnn-lm[plot]' (or pip install matplotlib)")
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "charrnn-plot") -> int:
    """Entry point of ``charrnn-plot`` / ``charrnn plot``."""
    return run_cli(lambda args: run(args, prog), argv)

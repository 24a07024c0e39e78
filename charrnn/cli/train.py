"""``charrnn train`` (also ``train.py``, ``charrnn-train``): train a model on a corpus."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..config import ModelConfig, TrainConfig
from ..generation.sampler import preview_text
from ..training.trainer import train
from .options import add_fields, fields_as_flags, new_parser, pick, run_cli, typed_flags

HELP = "train a model on a corpus"


def build_parser(defaults: bool = True, prog: str = "train.py") -> argparse.ArgumentParser:
    """The flags of ``charrnn train``: every TrainConfig and ModelConfig field."""
    parser = new_parser(
        prog,
        "Train a character-level RNN language model.",
        "Example: python train.py --data shakespeare   (then: python sample.py --prompt 'ROMEO:')",
    )
    add_fields(parser, TrainConfig, "data and training", defaults=defaults)
    add_fields(parser, ModelConfig, "model", defaults=defaults)
    return parser


def run(argv: list[str], prog: str = "train.py") -> int:
    args = vars(build_parser(prog=prog).parse_args(argv))
    # What was typed decides what a resumed run takes from the command line rather than from its checkpoint.
    explicit = typed_flags(lambda defaults: build_parser(defaults, prog), argv)
    with fields_as_flags(TrainConfig, ModelConfig):  # the configs' errors name fields; here they name flags
        result = train(pick(TrainConfig, args), pick(ModelConfig, args), explicit, preview=preview_text)
    print(
        f'  sample:  python sample.py --checkpoint {result.run_dir} --prompt "ROMEO:"\n'
        f"  resume:  python train.py --resume {result.last} --max-time SECONDS",
        file=sys.stderr,
    )
    return 128 + result.signal if result.signal else 0


def main(argv: Sequence[str] | None = None, prog: str = "train.py") -> int:
    """Entry point of ``train.py`` / ``charrnn-train`` / ``charrnn train``."""
    return run_cli(lambda args: run(args, prog), argv)

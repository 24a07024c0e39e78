"""``charrnn score``: a model's loss on texts, static and (with --dynamic) dynamic evaluation."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .._io import read_text_file
from ..checkpoint import load_checkpoint
from ..data.splits import read_run_data
from ..device import resolve_device
from ..errors import CorpusError
from ..evaluation import DYNAMIC_LR, LN2
from ..generation.sampler import Sampler
from ..generation.scoring import TextScore, score_texts
from .options import add_checkpoint_option, add_device_option, chosen_checkpoint, new_parser, run_cli

HELP = "measure a model's loss on text files or its validation split, optionally with dynamic evaluation"
MAX_TEXT_CHARS = 50_000_000


def build_parser(prog: str = "charrnn score") -> argparse.ArgumentParser:
    parser = new_parser(
        prog,
        "Mean nats per character (bits beside) of a model on each text file and in total, each file read as one "
        "stream from a fresh state; without files, the validation split (last 10%) of the corpus it was trained on.",
        "Examples: charrnn score --checkpoint checkpoints/RUN a.txt b.txt --json;  cat a.txt | charrnn score -",
    )
    parser.add_argument("files", nargs="*", metavar="FILE", help="UTF-8 text files to score; - reads standard input")
    add_checkpoint_option(parser)
    add_device_option(parser)
    parser.add_argument("--text-file", default=None, help="one more UTF-8 text to score, or - for stdin")
    parser.add_argument("--json", action="store_true", help="print the scores as one JSON object, for scripts")
    parser.add_argument(
        "--dynamic",
        action="store_true",
        help="also score with dynamic evaluation: a copy of the weights keeps learning from the text as it reads it, "
        "each segment scored before it is learnt from",
    )
    parser.add_argument("--dynamic-lr", type=float, default=DYNAMIC_LR, help="SGD step of dynamic evaluation")
    return parser


def _read(path: str, what: str) -> str:
    text = read_text_file(path, what, MAX_TEXT_CHARS, CorpusError, stdin=sys.stdin)
    if len(text) > MAX_TEXT_CHARS:
        raise CorpusError(f"{what} is over {MAX_TEXT_CHARS:,} characters: score a part of it")
    return text


def _line(score: TextScore, dynamic_lr: float) -> str:
    line = f"{score.name}: {score.chars:,} chars, {score.nats_per_char:.4f} nats/char ({score.bits_per_char:.3f} bpc)"
    if score.unknown_count:
        line += f"; {score.unknown_count:,} characters the model never saw ({''.join(score.unknown_chars[:20])!r}) read as <unk>"
    if score.dynamic_nats_per_char is not None:
        d = score.dynamic_nats_per_char
        line += f"\n  dynamic evaluation (lr {dynamic_lr:g}): {d:.4f} nats/char ({d / LN2:.3f} bpc)"
    return line


def run(argv: list[str], prog: str = "charrnn score") -> int:
    args = build_parser(prog).parse_args(argv)
    paths = [(p, "- (standard input)" if p == "-" else p) for p in args.files]
    if args.text_file is not None:
        paths.append((args.text_file, f"--text-file {args.text_file}"))
    if [p for p, _ in paths].count("-") > 1:
        raise CorpusError("standard input (-) can be scored once: give - only once")
    # Every file is read before the model loads, so a missing one fails at once.
    texts = [("standard input" if p == "-" else p, _read(p, what)) for p, what in paths]
    device = resolve_device(args.device)
    ckpt = load_checkpoint(chosen_checkpoint(args), device)
    if not texts:
        train = ckpt.meta.get("train", {})
        data = read_run_data(
            train.get("data", "shakespeare"),
            train.get("hf_split", "train"),
            train.get("hf_column"),
            train.get("val_data"),
            tokenizer=ckpt.tokenizer,
        )
        parts = data.val_parts or (("", data.val),)
        texts = [
            (
                f"the validation split of {name or train.get('data')!r} ({data.validates})",
                ckpt.tokenizer.decode(val[:].tolist()),
            )
            for name, val in parts
        ]
    longest = max(len(text) for _, text in texts)
    sampler = Sampler(ckpt.model, ckpt.tokenizer, device, max_prompt_chars=max(longest, 1), kernel=False)
    report = score_texts(sampler, texts, dynamic=args.dynamic, dynamic_lr=args.dynamic_lr)
    if args.json:
        print(json.dumps({"checkpoint": str(ckpt.path), **report.to_dict()}, indent=2, ensure_ascii=False))
        return 0
    for score in report.texts:
        print(_line(score, args.dynamic_lr))
    if len(report.texts) > 1:
        total = TextScore("total", report.chars, report.nats_per_char, [], 0, report.dynamic_nats_per_char)
        print(_line(total, args.dynamic_lr).replace("total:", f"total ({len(report.texts)} files):", 1))
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "charrnn score") -> int:
    """Entry point of ``charrnn score``."""
    return run_cli(lambda args: run(args, prog), argv)

"""One-stream sampling speed with each generation control, against plain sampling, in one run.

    python benchmarks/controls.py [--checkpoint checkpoints/RUN] [--chars 4000]

Without a checkpoint it times an untrained 2x512 LSTM over printable ASCII and newlines
(the size the budget rule picks for Tiny Shakespeare at 5 minutes; speed does not depend on
the weights, and every JSON character is in its vocabulary). Plain sampling runs the fused
kernel's whole loop; penalties, logprobs and constraints pick each character in torch
between the kernel's steps. A JSON text ends when its value is complete, so each setting
samples until it has written ``--chars`` characters and is timed per character written.
Each setting is timed three times, alternating, and the best of the three is printed, with
the ratio to plain and the machine's fp32 matmul peak beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import matmul_peak  # noqa: E402

import charrnn  # noqa: E402
from charrnn.config import ModelConfig  # noqa: E402
from charrnn.model import CharRNN  # noqa: E402
from charrnn.tokenizer import CharTokenizer  # noqa: E402

# An array of records: the items repeat, so a text goes on until the array closes.
PERSONS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
}
SETTINGS = {
    "plain": {},
    "frequency + presence penalties": {"frequency_penalty": 0.3, "presence_penalty": 0.3},
    "repetition penalty": {"repetition_penalty": 1.2},
    "DRY": {"dry_multiplier": 0.8},
    "logprobs, top 5": {"logprobs": 5},
    "regex (words and punctuation)": {"regex": r"([A-Za-z]+[ ,.;:!?\n]+)+"},
    "JSON schema (array of objects)": {"json_schema": json.dumps(PERSONS)},
}


def untrained_sampler() -> charrnn.Sampler:
    torch.manual_seed(0)
    tokenizer = CharTokenizer(["\n", *(chr(c) for c in range(32, 127))])
    regularisation = dict(dropout=0.0, input_dropout=0.0, embedding_dropout=0.0, weight_drop=0.0)  # training only
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=512, n_layers=2, **regularisation)
    return charrnn.Sampler(CharRNN(config).eval(), tokenizer)


def time_setting(sampler: charrnn.Sampler, chars: int, options: dict) -> float:
    """Seconds per character over samples that write ``chars`` characters in all."""
    written, seconds, seed = 0, 0.0, 1
    while written < chars:
        start = time.perf_counter()
        done = sampler.complete("ROMEO:", length=chars - written, temperature=0.8, seed=seed, **options)
        seconds += time.perf_counter() - start
        written, seed = written + len(done.text), seed + 1
    return seconds / written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a run to time (default: an untrained 2x512 LSTM)")
    parser.add_argument("--chars", type=int, default=4000, help="characters written per timing")
    args = parser.parse_args()
    sampler = charrnn.load(args.checkpoint, device="cpu") if args.checkpoint else untrained_sampler()
    for options in SETTINGS.values():  # the kernel built, the constraints compiled, all warm
        sampler.complete("ROMEO:", length=50, seed=1, **options)
    best = {name: float("inf") for name in SETTINGS}
    for _ in range(3):
        for name, options in SETTINGS.items():
            best[name] = min(best[name], time_setting(sampler, args.chars, options))
    model = sampler.model.config
    print(
        f"fp32 matmul peak: {matmul_peak(torch.float32):.0f} GFLOP/s; {model.n_layers}x{model.hidden_size} "
        f"{model.cell}, {args.chars:,} chars, one stream, best of 3"
    )
    for name, per_char in best.items():
        print(f"{name:>32}: {1 / per_char:>9,.0f} chars/s  ({per_char / best['plain']:.1f}x plain's time)")


if __name__ == "__main__":
    main()

"""One-stream sampling speed with each generation control, against plain sampling, in one run.

    python benchmarks/controls.py [--checkpoint checkpoints/RUN] [--chars 4000]

Without a checkpoint it times an untrained 2x512 LSTM over printable ASCII and newlines
(the size the budget rule picked for Tiny Shakespeare at 30 minutes on the 2026-12-08
machine; speed does not depend on the weights, and every JSON character is in its
vocabulary). Plain sampling runs the fused kernel's whole loop; penalties, logprobs and
constraints pick each character in torch between the kernel's steps. Each setting is
timed three times, alternating, and the best of the three is printed, with the ratio to
plain and the machine's fp32 matmul peak beside them.
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
from charrnn.errors import ConfigError  # noqa: E402
from charrnn.model import CharRNN  # noqa: E402
from charrnn.tokenizer import CharTokenizer  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def settings(chars: int) -> dict[str, dict]:
    """Each control's options; the regex and the schema cannot be complete before ``chars``
    characters, so every setting is timed over the same length."""
    return {
        "plain": {},
        "frequency + presence penalties": {"frequency_penalty": 0.3, "presence_penalty": 0.3},
        "repetition penalty": {"repetition_penalty": 1.2},
        "DRY": {"dry_multiplier": 0.8},
        "logprobs, top 5": {"logprobs": 5},
        "regex (words and punctuation)": {"regex": f"([A-Za-z]+[ ,.;:!?\\n]){{{chars}}}"},
        "JSON schema (array of records)": {"json_schema": json.dumps({"type": "array", "items": PERSON, "minItems": chars})},
    }


def untrained_sampler() -> charrnn.Sampler:
    torch.manual_seed(0)
    tokenizer = CharTokenizer(["\n", *(chr(c) for c in range(32, 127))])
    regularisation = dict(dropout=0.0, input_dropout=0.0, embedding_dropout=0.0, weight_drop=0.0)  # training only
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=512, n_layers=2, **regularisation)
    return charrnn.Sampler(CharRNN(config).eval(), tokenizer)


def time_setting(sampler: charrnn.Sampler, chars: int, options: dict) -> float:
    start = time.perf_counter()
    done = sampler.complete("ROMEO:", length=chars, temperature=0.8, seed=1, **options)
    assert len(done.text) == chars, f"{options} ended after {len(done.text)} characters"
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a run to time (default: an untrained 2x512 LSTM)")
    parser.add_argument("--chars", type=int, default=4000, help="characters written per timing")
    args = parser.parse_args()
    sampler = charrnn.load(args.checkpoint, device="cpu") if args.checkpoint else untrained_sampler()
    timed = settings(args.chars)
    for name, options in list(timed.items()):  # the kernel built, the constraints compiled, all warm
        try:
            sampler.complete("ROMEO:", length=50, seed=1, **options)
        except ConfigError as error:  # a checkpoint whose corpus has no '{', say
            print(f"{name}: left out, {error}")
            del timed[name]
    best = {name: float("inf") for name in timed}
    for _ in range(3):
        for name, options in timed.items():
            best[name] = min(best[name], time_setting(sampler, args.chars, options))
    # What a constrained reply costs before its first character: its guide and first mask.
    first = min(time_setting(sampler, 1, {"regex": "[a-z]"}) for _ in range(5))
    plain_first = min(time_setting(sampler, 1, {}) for _ in range(5))
    model = sampler.model.config
    print(
        f"fp32 matmul peak: {matmul_peak(torch.float32):.0f} GFLOP/s; {model.n_layers}x{model.hidden_size} "
        f"{model.cell}, {args.chars:,} chars, one stream, best of 3"
    )
    for name, seconds in best.items():
        print(f"{name:>32}: {args.chars / seconds:>9,.0f} chars/s  ({seconds / best['plain']:.1f}x plain's time)")
    print(f"one-character reply: {plain_first * 1e3:.1f} ms plain, {first * 1e3:.1f} ms with a regex")


if __name__ == "__main__":
    main()

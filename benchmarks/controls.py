"""One-stream sampling speed with each generation control, against plain sampling, in one run.

    python benchmarks/controls.py --checkpoint checkpoints/RUN [--chars 4000]

Plain sampling runs the fused kernel's whole loop; a penalised run picks each character
in torch between the kernel's steps. Each setting is timed three times, alternating, and
the best of the three is printed, with the ratio to plain and the machine's fp32 matmul
peak beside them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import matmul_peak  # noqa: E402

import charrnn  # noqa: E402

SETTINGS = {
    "plain": {},
    "frequency + presence penalties": {"frequency_penalty": 0.3, "presence_penalty": 0.3},
    "repetition penalty": {"repetition_penalty": 1.2},
    "DRY": {"dry_multiplier": 0.8},
    "all four": {"frequency_penalty": 0.3, "presence_penalty": 0.3, "repetition_penalty": 1.2, "dry_multiplier": 0.8},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--chars", type=int, default=4000, help="characters per timed sample")
    args = parser.parse_args()
    sampler = charrnn.load(args.checkpoint, device="cpu")
    sampler.generate("ROMEO:", length=200, seed=1)  # the kernel built and warm
    best = {name: float("inf") for name in SETTINGS}
    for _ in range(3):
        for name, options in SETTINGS.items():
            start = time.perf_counter()
            sampler.generate("ROMEO:", length=args.chars, temperature=0.8, seed=1, **options)
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"fp32 matmul peak: {matmul_peak(torch.float32):.0f} GFLOP/s; {args.chars:,} chars, one stream, best of 3")
    for name, seconds in best.items():
        print(f"{name:>32}: {args.chars / seconds:>9,.0f} chars/s  ({seconds / best['plain']:.1f}x plain's time)")


if __name__ == "__main__":
    main()

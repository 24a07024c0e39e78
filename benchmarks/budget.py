"""Training quality at a wall-clock budget: charrnn's recipes against a plain script.

    python benchmarks/budget.py speed                    # chars/s of each candidate size here
    python benchmarks/budget.py ref --seconds 60         # the plain fp32 nn.LSTM script
    python benchmarks/budget.py run --seconds 60 --dtype float32 [--hidden-size 256 ...]
    python benchmarks/budget.py compare --seconds 60 --dtype float32   # defaults vs the script
    python benchmarks/budget.py run --seconds 300 --dtype auto --variant ema   # a recipe variant
    python benchmarks/budget.py pycorpus --data /tmp/pystd   # the second corpus: the stdlib's modules
    python benchmarks/budget.py pycorpus --data /tmp/py150k.txt --chars 150000   # its first 150k chars

Every run appends one JSON line to ``--results`` (default benchmarks/results/budget.jsonl)
with the machine's matmul peaks beside it, so figures from different machines are never
mixed up: compare ratios and differences measured in the same run.

The reference is what a typical user writes: fp32 ``nn.LSTM`` 2x512, embedding 64,
Adam at a constant 2e-3, gradient norm clipped at 5, batches of 64 x 100, state carried
across batches. Both sides are scored the same way: the full validation split (the last
10% of the corpus) in nats per character, by ``charrnn``'s own evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import matmul_peak, train_reference  # noqa: E402
from recipes import VARIANTS  # noqa: E402

from charrnn.config import ModelConfig, TrainConfig  # noqa: E402
from charrnn.training.trainer import Trainer  # noqa: E402

# The settings `auto` chooses, recorded for every run so that a row says what it trained.
RECORDED_TRAIN = ("batch_size", "seq_len", "lr", "min_lr", "warmup_iters", "weight_decay", "grad_clip")


def train_charrnn(data: str, seconds: float, dtype: str, model_args: dict, train_args: dict, variant: str | None = None) -> dict:
    """charrnn's trainer for ``seconds`` (its own --max-time); the best full-split validation loss.

    ``variant`` names a recipe change from ``recipes.VARIANTS`` applied before training.
    """
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            data=data,
            out=out,
            max_time=seconds,
            dtype=dtype,
            device="cpu",
            progress=False,
            sample_chars=0,
            plot=False,
            **train_args,
        )
        start = time.perf_counter()
        trainer = Trainer(config, ModelConfig(**model_args))
        if variant:
            VARIANTS[variant](trainer)
        result = trainer.run()
        wall = time.perf_counter() - start
        meta = json.loads((Path(out) / "best" / "config.json").read_text())
    return {
        "kind": "charrnn",
        "data": data,
        "variant": variant,
        "dtype": dtype,
        "model": meta["model"],
        "train": {k: meta["train"][k] for k in (*RECORDED_TRAIN, *train_args)},
        "plan": trainer.plan.reason,
        "stop": result.stop_reason,
        "steps": result.step,
        "val": result.best_val_loss,
        "wall": wall,
    }


def chars_per_second(hidden: int, layers: int, batch: int, seq: int, dtype: str, seconds: float = 4.0) -> float:
    """Training throughput of one size on this machine, through charrnn's own step."""
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            data="shakespeare",
            out=out,
            seq_len=seq,
            batch_size=batch,
            max_iters=10**9,
            max_time=0,
            progress=False,
            sample_chars=0,
            device="cpu",
            dtype=dtype,
            warmup_iters=0,
            plot=False,
        )
        trainer = Trainer(config, ModelConfig(hidden_size=hidden, n_layers=layers))
        trainer.train_step()
        n, start = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - start < seconds:
            trainer.train_step()
            n += 1
        return n * batch * seq / (time.perf_counter() - start)


def python_corpus(dest: Path, chars: int = 0) -> Path:
    """The study's second corpus: the top-level modules of this Python's standard library.

    A folder of .py files, in sorted order (charrnn reads a folder's text files in sorted
    order); 4.7 MB for CPython 3.11, nearly five times Tiny Shakespeare, and code rather than verse.
    With ``chars``, one file instead: the first ``chars`` characters of those files joined
    (150,000 give the small corpus of the data-limited study).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(stdlib.glob("*.py"))
    if chars:
        text = "".join(source.read_text(encoding="utf-8") for source in sources)[:chars]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text, encoding="utf-8")
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for source in sources:
        shutil.copyfile(source, dest / source.name)
    return dest


def record(path: Path, row: dict, peaks: dict) -> None:
    row = {**row, "peak_gflops": peaks, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps(row), flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def plot(results: Path, out: Path) -> Path:
    """Best loss against budget for each size and precision (the plain script as a dashed line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines() if line.strip()]
    curves: dict[str, dict[float, float]] = {}
    for r in rows:
        if r.get("data", "shakespeare") != "shakespeare" or r.get("variant"):
            continue  # the plot is the defaults' recipe on Tiny Shakespeare, by size
        if r["kind"] == "charrnn":
            m = r["model"]
            label = f"{m['n_layers']}x{m['hidden_size']} {r['dtype']}"
        elif r["kind"] == "reference":
            label = "plain script 2x512 float32"
        else:
            continue
        best = curves.setdefault(label, {})
        best[r["seconds"]] = min(best.get(r["seconds"], math.inf), r["val"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(curves.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], "--" if label.startswith("plain") else "-", marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training budget (s, this machine)")
    ax.set_ylabel("validation loss (nats/char, full split)")
    ax.set_title("Tiny Shakespeare: best loss a budget buys, by size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "ref", "run", "compare", "plot", "pycorpus"])
    parser.add_argument("--data", default="shakespeare")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "budget.jsonl")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="a recipe change to try (benchmarks/recipes.py)")
    parser.add_argument("--model", type=json.loads, default={}, help='ModelConfig fields as JSON, e.g. {"hidden_size": 256}')
    parser.add_argument("--train", type=json.loads, default={}, help='TrainConfig fields as JSON, e.g. {"lr": 2e-3}')
    parser.add_argument("--sizes", default="128x1,128x2,256x1,256x2,384x2,512x1,512x2,512x3,768x2,1024x2")
    parser.add_argument("--chars", type=int, default=0, help="pycorpus: one file of the first N characters")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=100)
    args = parser.parse_args()
    if args.what == "pycorpus":
        print(python_corpus(Path(args.data), args.chars))
        return
    if args.what == "plot":
        print(plot(args.results, ROOT / "docs" / "scaling.png"))
        return
    torch.manual_seed(0)
    peaks = {"fp32": round(matmul_peak(torch.float32)), "bf16": round(matmul_peak(torch.bfloat16))}
    print(f"matmul peak here: fp32 {peaks['fp32']} GFLOP/s, bf16 {peaks['bf16']} GFLOP/s", flush=True)
    if args.what == "speed":
        for size in args.sizes.split(","):
            hidden, layers = map(int, size.split("x"))
            speed = chars_per_second(hidden, layers, args.batch, args.seq, args.dtype)
            record(
                args.results,
                {
                    "kind": "speed",
                    "hidden": hidden,
                    "layers": layers,
                    "batch": args.batch,
                    "seq": args.seq,
                    "dtype": args.dtype,
                    "chars_per_s": round(speed),
                },
                peaks,
            )
        return
    if args.what in ("ref", "compare"):
        ref = train_reference(args.data, args.seconds)
        record(args.results, {"kind": "reference", "data": args.data, **ref, "seconds": args.seconds}, peaks)
    if args.what in ("run", "compare"):
        ours = train_charrnn(args.data, args.seconds, args.dtype, args.model, args.train, args.variant)
        record(args.results, {**ours, "seconds": args.seconds}, peaks)
    if args.what == "compare":
        print(
            f"{args.seconds:g} s, {args.dtype}: charrnn {ours['val']:.4f}, plain script {ref['val']:.4f}, "
            f"charrnn lower by {ref['val'] - ours['val']:+.4f} nats/char"
        )


if __name__ == "__main__":
    main()

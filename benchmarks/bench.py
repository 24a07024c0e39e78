"""charrnn against plain PyTorch, side by side in one run, on this machine.

    python benchmarks/bench.py            # the full table (about 10 minutes, plus 5 for --quality)
    python benchmarks/bench.py --quick    # a smoke run in well under a minute
    python benchmarks/bench.py --quality  # also: train.py's defaults against a plain script, 300 s each
    python benchmarks/bench.py --quality-only --quality-seconds 60 --quality-dtypes float32
    python benchmarks/bench.py --scale-only   # section 6 alone: 210 MB and 2 GB corpora, a 500 MB hf: folder

The reference is what a typical user writes: an fp32 ``nn.LSTM`` (or GRU / RNN) called
as is, trained with Adam and clipping, and sampled by calling it once per character.
Every ratio in the table compares two measurements taken in this same run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charrnn.config import ModelConfig, TrainConfig  # noqa: E402
from charrnn.data.corpus import load_corpus  # noqa: E402
from charrnn.data.splits import split_tokens  # noqa: E402
from charrnn.data.streams import BatchStreams, StreamPosition  # noqa: E402
from charrnn.data.token_cache import corpus_tokens  # noqa: E402
from charrnn.evaluation import evaluate  # noqa: E402
from charrnn.generation.sampler import Sampler, load  # noqa: E402
from charrnn.model import CharRNN  # noqa: E402
from charrnn.tokenizer import CharTokenizer  # noqa: E402
from charrnn.training.trainer import Trainer  # noqa: E402

VOCAB = 65


# --- the plain-PyTorch reference ----------------------------------------------------------


class Reference(nn.Module):
    """What a user writes by hand: embedding, nn.LSTM/GRU/RNN, linear head; fp32."""

    def __init__(self, cell: str, vocab: int, emb: int, hidden: int, layers: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN}[cell]
        self.rnn = rnn(emb, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(self.embedding(x), hidden)
        return self.head(out), hidden


def train_reference(data: str, seconds: float, seed: int = 1337) -> dict:
    """The plain script for ``seconds`` of training steps, and its loss on the full validation split.

    As a typical user writes it: fp32 LSTM 2x512, embedding 64, Adam at a constant 2e-3,
    gradient norm clipped at 5, batches of 64 x 100 with the state carried across them.
    It is scored by charrnn's own evaluation, exactly as charrnn's runs are.
    """
    tokens, tokenizer = corpus_tokens(data)
    train_tokens, val_tokens = split_tokens(tokens)
    torch.manual_seed(seed)
    model = Reference("lstm", tokenizer.vocab_size, 64, 512, 2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    streams = BatchStreams(train_tokens, 64, 100, seed)
    pos, hidden, steps, elapsed = StreamPosition(), None, 0, 0.0
    while elapsed < seconds:
        start = time.perf_counter()
        if pos.index == 0:
            hidden = None
        x, y = streams.get(pos)
        logits, hidden = model(x, hidden)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        hidden = detach(hidden)
        pos = streams.next(pos)
        steps += 1
        elapsed += time.perf_counter() - start
    return {"steps": steps, "val": evaluate(model, val_tokens), "chars_per_s": steps * 64 * 100 / elapsed}


def detach(hidden):
    return tuple(h.detach() for h in hidden) if isinstance(hidden, tuple) else hidden.detach()


def steady_malloc() -> None:
    """Keep freed memory in the process instead of handing it back to the OS at once.

    The reference's nn.LSTM allocates and frees a buffer of about 12 MB on every call.
    Depending on what the process did before, glibc either reuses it or unmaps it and
    faults 3,000 fresh pages in on the next call, and the same loop runs at 300 or at
    750 chars/s. Fixed thresholds put both sides in the fast state, every run.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to steady
        return
    libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: buffers below 64 MB come from the heap
    libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: and stay there once freed


def matmul_peak(dtype: torch.dtype, size: int = 1024, seconds: float = 1.0) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e9


def flops_per_char(model: nn.Module) -> float:
    """Training cost: 2 FLOPs per weight forward, 4 backward, for every matrix but the embedding."""
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embedding" not in n)
    return 6.0 * weights


def time_steps(step, warmup: int, seconds: float, min_steps: int = 3) -> float:
    """Seconds per call of step(), after warm-up."""
    for _ in range(warmup):
        step()
    n, start = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - start < seconds:
        step()
        n += 1
    return (time.perf_counter() - start) / n


def write_corpus(path: Path, chars: int) -> None:
    """A corpus for the training benchmark: Tiny Shakespeare when cached, else random words."""
    shakespeare = ROOT / "data" / "shakespeare" / "input.txt"
    if shakespeare.exists():
        path.write_text(shakespeare.read_text(encoding="utf-8")[:chars], encoding="utf-8")
        return
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(1, 9))) for _ in range(2000)]
    text = " ".join(rng.choice(words, chars // 5)) + "\n"
    path.write_text(text[:chars], encoding="utf-8")


# --- 1 and 2: training ------------------------------------------------------------------------


def bench_training(cell: str, args, corpus: Path, peak_bf16: float, peak_fp32: float) -> dict:
    hidden, layers, emb, seq, batch = args.hidden, 2, args.emb, args.seq_len, args.batch
    config = TrainConfig(
        data=str(corpus),
        out=tempfile.mkdtemp(),
        seq_len=seq,
        batch_size=batch,
        max_iters=10**9,
        max_time=0,
        progress=False,
        sample_chars=0,
        device="cpu",
        warmup_iters=0,
        lr=2e-3,
        min_lr=2e-3,
    )
    trainer = Trainer(config, ModelConfig(cell=cell, n_layers=layers, hidden_size=hidden, embedding_size=emb, dropout=0.0))
    vocab = trainer.tokenizer.vocab_size

    torch.manual_seed(0)
    ref = Reference(cell, vocab, emb, hidden, layers)
    ref.load_state_dict(trainer.model.state_dict(), strict=False)  # same initial weights
    ref_opt = torch.optim.Adam(ref.parameters(), lr=2e-3)
    ref_state = {"hidden": None, "pos": trainer.position}
    streams = trainer.streams

    def ref_step() -> float:
        x, y = streams.get(ref_state["pos"])
        if ref_state["pos"].index == 0:
            ref_state["hidden"] = None
        logits, h = ref(x, ref_state["hidden"])
        loss = F.cross_entropy(logits.view(-1, vocab), y.view(-1))
        ref_opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(ref.parameters(), 5.0)
        ref_opt.step()
        ref_state["hidden"] = detach(h)
        ref_state["pos"] = streams.next(ref_state["pos"])
        return loss.item()

    # Loss agreement: the same initial weights and batches, 50 steps each.
    ours = [trainer.train_step() for _ in range(args.agree_steps)]
    theirs = [ref_step() for _ in range(args.agree_steps)]
    window = min(5, args.agree_steps)
    agree = abs(np.mean(ours[-window:]) - np.mean(theirs[-window:]))

    chars = seq * batch
    t_ours = time_steps(trainer.train_step, 1, args.seconds)
    t_ref = time_steps(ref_step, 1, args.seconds)
    fpc = flops_per_char(trainer.model)
    peak = peak_bf16 if trainer.dtype == torch.bfloat16 else peak_fp32
    return {
        "cell": cell,
        "ours": chars / t_ours,
        "ref": chars / t_ref,
        "gflops": fpc * chars / t_ours / 1e9,
        "peak": peak,
        "dtype": str(trainer.dtype).replace("torch.", ""),
        "loss_ours": float(np.mean(ours[-window:])),
        "loss_ref": float(np.mean(theirs[-window:])),
        "agree": agree,
    }


# --- 3: sampling --------------------------------------------------------------------------------


def reference_sample(ref: Reference, streams: int, length: int, seed: int = 0) -> float:
    """chars/s of the naive loop: nn.LSTM called on one character at a time."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(streams, 1, dtype=torch.long)
    hidden = None
    with torch.no_grad():
        for step in range(20 + length):
            if step == 20:  # after a warm-up: oneDNN prepares its kernels on the first calls
                start = time.perf_counter()
            logits, hidden = ref(x, hidden)
            probs = torch.softmax(logits[:, -1] / 0.8, dim=-1)
            x = torch.multinomial(probs, 1, generator=g)
        return streams * length / (time.perf_counter() - start)


def stepwise_logits(stepper, model: CharRNN, x: torch.Tensor) -> torch.Tensor:
    hidden, out = model.init_hidden(x.size(0)), []
    with torch.no_grad():
        for t in range(x.size(1)):
            logits, hidden = stepper.step(x[:, t], hidden)
            out.append(logits)
    return torch.stack(out, 1)


def sampling_rate(sampler: Sampler, streams: int, length: int) -> float:
    """chars/s of Sampler.generate (one stream) or generate_many, after a warm-up call."""
    if streams == 1:
        run = lambda n: sampler.generate("A", length=n, seed=0)  # noqa: E731
    else:
        run = lambda n: sampler.generate_many("A", streams, length=n, seed=0)  # noqa: E731
    run(max(10, length // 10))
    start = time.perf_counter()
    run(length)
    return streams * length / (time.perf_counter() - start)


def bench_sampling(args) -> dict:
    torch.manual_seed(0)
    model = CharRNN(
        ModelConfig(vocab_size=VOCAB, cell="lstm", n_layers=2, hidden_size=args.hidden, embedding_size=args.emb, dropout=0.0)
    )
    model.eval()
    tokenizer = CharTokenizer([chr(32 + i) for i in range(VOCAB - 1)])
    ref = Reference("lstm", VOCAB, args.emb, args.hidden, 2).eval()
    ref.load_state_dict(model.state_dict(), strict=False)
    auto, exact = Sampler(model, tokenizer), Sampler(model, tokenizer, dtype=torch.float32)

    # Correctness of each step: stepwise logits against the reference's, same weights and input.
    x = torch.randint(VOCAB, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x)[0]
    steppers = {"float32": exact.stepper(1), "1 stream (auto)": auto.stepper(1), "64 streams (auto)": auto.stepper(64)}
    diffs = {name: float((stepwise_logits(st, model, x) - want).abs().max()) for name, st in steppers.items()}
    kinds = {name: f"{type(st).__name__} {str(st.dtype).replace('torch.', '')}" for name, st in steppers.items()}

    n1, n64 = args.sample_chars, args.sample_chars_batch
    return {
        "ours1": sampling_rate(auto, 1, n1),
        "exact1": sampling_rate(exact, 1, n1 // 2),
        "ref1": reference_sample(ref, 1, max(50, n1 // 10)),
        "ours64": sampling_rate(auto, 64, n64),
        "exact64": sampling_rate(exact, 64, n64 // 2),
        "ref64": reference_sample(ref, 64, max(20, n64 // 4)),
        "diffs": diffs,
        "kinds": kinds,
    }


# --- 4: memory -------------------------------------------------------------------------------------


def child_measure(code: str, preload: str = "") -> tuple[float, float, float]:
    """Run ``code`` in a fresh Python that has imported torch and charrnn: the number it
    prints last, the peak RSS (MB) while it ran above the RSS it started from, and the
    anonymous memory (MB) it added by its end.

    The peak is reset just before ``code`` (Linux: /proc/self/clear_refs), so memory the
    imports used and freed cannot hide what the work itself needs. Anonymous memory
    leaves out the pages of memory-mapped files (the token cache), which are page cache
    the kernel can drop at any time. ``preload`` is code run before the peak is reset
    (imports whose memory is not the work's)."""
    prologue = (
        "import torch, charrnn\n"
        f"{preload}\n"
        "def rss(field):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(field): return int(line.split()[1])\n"
        "base, anon = rss('VmRSS:'), rss('RssAnon:'); open('/proc/self/clear_refs', 'w').write('5')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", prologue + code + "\nprint(base, rss('VmHWM:'), anon, rss('RssAnon:'))"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    lines = out.stdout.strip().splitlines()
    base, peak, anon_start, anon_end = map(int, lines[-1].split())
    value = float(lines[-2]) if len(lines) > 1 else 0.0
    return value, (peak - base) / 1024, (anon_end - anon_start) / 1024


def child_peak_rss(code: str) -> float:
    """Peak RSS (MB) that ``code`` adds to a fresh interpreter with torch and charrnn imported."""
    return child_measure(code)[1]


def child_anon(code: str) -> float:
    """Anonymous memory (MB) that ``code`` leaves added to a fresh interpreter."""
    return child_measure(code)[2]


def bench_memory(args, corpus: Path) -> dict:
    setup = (
        "import torch; from charrnn.model import CharRNN; from charrnn.config import ModelConfig\n"
        "from charrnn.generation.sampler import Sampler; from charrnn.tokenizer import CharTokenizer\n"
        f"m = CharRNN(ModelConfig(vocab_size={VOCAB}, n_layers=2, hidden_size={args.hidden}, embedding_size={args.emb}, dropout=0.0))\n"
        f"s = Sampler(m, CharTokenizer([chr(32 + i) for i in range({VOCAB - 1})]))\n"
    )
    small = child_peak_rss(setup + "s.generate('A', length=1000, seed=0)")
    large = child_peak_rss(setup + f"s.generate('A', length={args.memory_chars}, seed=0)")
    train = child_anon(
        "from charrnn.training.trainer import Trainer; from charrnn.config import TrainConfig, ModelConfig\n"
        f"t = Trainer(TrainConfig(data={str(corpus)!r}, out={tempfile.mkdtemp()!r}, seq_len={args.seq_len}, "
        f"batch_size={args.batch}, max_iters=10, max_time=0, progress=False, sample_chars=0, device='cpu'), "
        f"ModelConfig(n_layers=2, hidden_size={args.hidden}, embedding_size={args.emb}, dropout=0.0))\n"
        "for _ in range(5): t.train_step()"
    )
    return {"sample_small": small, "sample_large": large, "train": train}


# --- 5: quality at a budget ---------------------------------------------------------------------


def bench_quality(seconds: int, dtypes: list[str]) -> dict:
    """``train.py --data shakespeare`` with its defaults in each precision, then the plain script,
    each for ``seconds`` of training, one after the other."""
    runs = {}
    for dtype in dtypes:
        out = tempfile.mkdtemp()
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "train.py",
                "--data",
                "shakespeare",
                "--max-time",
                str(seconds),
                "--dtype",
                dtype,
                "--out",
                out,
                "--sample-chars",
                "0",
                "--no-plot",
            ],
            cwd=ROOT,
            check=True,
        )
        meta = json.loads((Path(out) / "best" / "config.json").read_text())
        model = meta["model"]
        runs[dtype] = {
            "val": meta["best_val_loss"],
            "wall": time.perf_counter() - start,
            "steps": meta["step"],
            "size": f"{model['n_layers']}x{model['hidden_size']}",
            "dtype": meta["dtype"],
            "path": out,
        }
    ref = train_reference("shakespeare", seconds)
    # What each sampling precision costs: the validation split scored through the sampling step.
    text = load_corpus("shakespeare")
    val = text[len(split_tokens(np.arange(len(text)))[0]) :]
    exact = load(Path(runs[dtypes[0]]["path"]) / "best", device="cpu")
    stepped = {
        precision: Sampler(exact.model, exact.tokenizer, dtype=precision, max_prompt_chars=len(val)).score(val, stepped=True)
        for precision in ("float32", "int8", "bfloat16")
    }
    return {"runs": runs, "ref": ref, "stepped": stepped}


# --- 6: corpora larger than memory -----------------------------------------------------------


def _word_lines(n_lines: int, seed: int = 0) -> list[str]:
    """About 600 KB lines of random words: written in random order, they make a corpus of any size
    far faster than drawing every word (the encoder's speed does not depend on the words)."""
    rng = np.random.default_rng(seed)
    words = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(1, 10))) for _ in range(5000)])
    return [" ".join(rng.choice(words, 100_000)) + ".\n" for _ in range(n_lines)]


def write_big_corpus(path: Path, megabytes: int) -> None:
    """A generated text file of ``megabytes`` MiB."""
    lines, rng = _word_lines(64), np.random.default_rng(1)
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < megabytes << 20:
            f.write(lines[int(rng.integers(len(lines)))])


def write_parquet_dataset(folder: Path, megabytes: int, shard_mb: int = 64) -> int:
    """A local Hugging Face dataset: parquet shards (snappy, a ``text`` column of ~6 KB rows) that take
    ``megabytes`` MiB of disk. Returns the characters of text in it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    lines, rng = _word_lines(64, seed=2), np.random.default_rng(3)
    shard, chars = 0, 0
    while sum(p.stat().st_size for p in folder.glob("*.parquet")) < megabytes << 20:
        rows = []
        while sum(map(len, rows)) < shard_mb << 20:
            line = lines[int(rng.integers(len(lines)))]
            rows += [line[i : i + 6000] for i in range(0, len(line), 6000)]
        chars += sum(map(len, rows))
        # Row groups of 8 MB or so: what a reader holds at a time (hub datasets use similar sizes).
        pq.write_table(pa.table({"text": rows}), folder / f"train-{shard:05d}.parquet", row_group_size=1500)
        shard += 1
    return chars


def bench_large_corpus(megabytes: int, args) -> dict:
    """Encode a generated corpus into its token cache, then start training on it (a cache hit)."""
    with tempfile.TemporaryDirectory(dir=args.scale_dir) as tmp:
        corpus = Path(tmp) / "big.txt"
        write_big_corpus(corpus, megabytes)
        size = corpus.stat().st_size
        encode = child_measure(
            "import time; from charrnn.data.token_cache import corpus_tokens\n"
            f"t = time.perf_counter(); tokens, _ = corpus_tokens({str(corpus)!r}); print(time.perf_counter() - t)"
        )
        first_step = (
            "import time; t = time.perf_counter()\n"
            "from charrnn.training.trainer import Trainer; from charrnn.config import TrainConfig, ModelConfig\n"
            f"tr = Trainer(TrainConfig(data={str(corpus)!r}, out={tmp!r}, seq_len={args.seq_len}, batch_size={args.batch}, "
            "max_iters=10, max_time=0, progress=False, sample_chars=0, device='cpu'), "
            f"ModelConfig(n_layers=2, hidden_size={args.hidden}, embedding_size={args.emb}, dropout=0.0))\n"
            "tr.train_step(); print(time.perf_counter() - t)\n"
            "for _ in range(4): tr.train_step()"
        )
        hit = child_measure(first_step)
        return {"mb": size / 1e6, "encode_s": encode[0], "encode_rss": encode[1], "hit_s": hit[0], "train_anon": hit[2]}


def bench_hf_folder(megabytes: int, args) -> dict:
    """Encode a local parquet dataset folder (``hf:FOLDER``) through the same streaming path."""
    with tempfile.TemporaryDirectory(dir=args.scale_dir) as tmp:
        folder = Path(tmp) / "dataset"
        chars = write_parquet_dataset(folder, megabytes, shard_mb=min(64, megabytes))
        disk = sum(p.stat().st_size for p in folder.glob("*.parquet"))
        code = (
            "import os, time; from charrnn.data.token_cache import corpus_tokens\n"
            f"os.environ['CHARRNN_DATA_DIR'] = {tmp!r}; os.environ['HF_DATASETS_CACHE'] = {tmp + '/hf'!r}\n"
            f"t = time.perf_counter(); tokens, _ = corpus_tokens('hf:' + {str(folder)!r}); print(time.perf_counter() - t)"
        )
        encode = child_measure(code, preload="import datasets, pyarrow")
        return {
            "disk_mb": disk / 1e6,
            "shards": len(list(folder.glob("*.parquet"))),
            "chars": chars,
            "encode_s": encode[0],
            "encode_rss": encode[1],
        }


def scale_table(args, train_anon_small: float | None) -> None:
    """Section 6: generated corpora of each --large-mb size side by side, and an hf: parquet folder."""
    sizes = [5] if args.quick else [int(mb) for mb in args.large_mb.split(",") if int(mb)]
    if sizes:
        print("\n6. generated corpora: encoding into the token cache, then a second run (cache hit)")
        print(
            f"   {'corpus':>8} {'encode MB/s':>11} {'encode s':>9} {'peak RSS added':>15} {'x corpus':>8} "
            f"{'first step (hit)':>16} {'training anon':>13}"
        )
    for mb in sizes:
        g = bench_large_corpus(mb, args)
        print(
            f"   {g['mb']:>5.0f} MB {g['mb'] / g['encode_s']:>11.0f} {g['encode_s']:>9.1f} {g['encode_rss']:>12.0f} MB "
            f"{g['encode_rss'] / g['mb']:>8.3f} {g['hit_s']:>14.2f} s {g['train_anon']:>10.0f} MB"
        )
    if sizes and train_anon_small is not None:
        print(f"   (training on a 2 MB corpus: +{train_anon_small:.0f} MB anonymous)")
    hf_mb = 2 if args.quick else args.hf_mb
    if hf_mb:
        h = bench_hf_folder(hf_mb, args)
        mb = h["chars"] / 1e6
        print(
            f"   hf: a local folder of {h['shards']} parquet shards, {h['disk_mb']:.0f} MB on disk, {mb:.0f} M characters: "
            f"encoding {mb / h['encode_s']:.0f} M chars/s ({h['encode_s']:.1f} s), peak RSS added +{h['encode_rss']:.0f} MB "
            f"({h['encode_rss'] / mb:.3f}x the text)"
        )


# --- the table ------------------------------------------------------------------------------------


def throughput_tables(args, peak16: float, peak32: float) -> None:
    """Sections 1-4 and 6: training and sampling speed, memory, a large corpus."""
    size = f"2x{args.hidden}, seq {args.seq_len}, batch {args.batch}"
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        write_corpus(corpus, 2_000_000 if not args.quick else 200_000)
        print(f"\n1-2. training throughput ({size}) and loss agreement after {args.agree_steps} steps")
        print(
            f"{'cell':<9} {'charrnn chars/s':>15} {'reference':>10} {'ratio':>6} {'GFLOP/s':>8} {'% peak':>7} "
            f"{'loss ours':>9} {'loss ref':>9} {'|diff|':>7}"
        )
        for cell in args.cells:
            r = bench_training(cell, args, corpus, peak16, peak32)
            print(
                f"{cell:<9} {r['ours']:>15,.0f} {r['ref']:>10,.0f} {r['ours'] / r['ref']:>5.2f}x {r['gflops']:>8.0f} "
                f"{100 * r['gflops'] / r['peak']:>6.0f}% {r['loss_ours']:>9.4f} {r['loss_ref']:>9.4f} {r['agree']:>7.4f}"
                f"   ({r['dtype']} vs float32)"
            )

        s = bench_sampling(args)
        print(f"\n3. sampling, LSTM 2x{args.hidden}: charrnn's Sampler against nn.LSTM called per character")
        print(
            f"   1 stream:   {s['ours1']:>9,.0f} chars/s vs {s['ref1']:>8,.0f}  ({s['ours1'] / s['ref1']:.1f}x)   "
            f"[{s['kinds']['1 stream (auto)']}]; float32: {s['exact1']:,.0f} ({s['exact1'] / s['ref1']:.1f}x)"
        )
        print(
            f"   64 streams: {s['ours64']:>9,.0f} chars/s vs {s['ref64']:>8,.0f}  ({s['ours64'] / s['ref64']:.1f}x)   "
            f"[{s['kinds']['64 streams (auto)']}]; float32: {s['exact64']:,.0f} ({s['exact64'] / s['ref64']:.1f}x)"
        )
        for name, diff in s["diffs"].items():
            print(f"   stepwise logits vs reference, {name} [{s['kinds'][name]}]: max |diff| {diff:.2e}")

        m = bench_memory(args, corpus)
        print(
            f"\n4. memory added by the work (above python + torch): training {m['train']:.0f} MB anonymous; peak RSS sampling 1,000 chars "
            f"{m['sample_small']:.0f} MB, {args.memory_chars:,} chars {m['sample_large']:.0f} MB"
        )

    scale_table(args, m["train"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and short timings: a smoke run")
    parser.add_argument("--quality", action="store_true", help="also train with defaults for --quality-seconds")
    parser.add_argument("--quality-seconds", type=int, default=300)
    parser.add_argument(
        "--quality-dtypes",
        default="auto,float32",
        help="comma-separated --dtype values of charrnn's quality runs (the plain script is fp32)",
    )
    parser.add_argument("--quality-only", action="store_true", help="run section 5 alone")
    parser.add_argument(
        "--large-mb", default="200,2048", help="sizes (MiB, comma-separated) of the generated corpora of section 6 (0: skip)"
    )
    parser.add_argument("--hf-mb", type=int, default=500, help="disk size (MiB) of the hf: parquet folder of section 6 (0: skip)")
    parser.add_argument(
        "--scale-dir", default=None, help="where section 6 writes its corpora, removed after (default: the temp folder)"
    )
    parser.add_argument("--scale-only", action="store_true", help="run section 6 alone")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.emb, args.seq_len, args.batch = 128, 32, 32, 16
        args.seconds, args.agree_steps, args.cells = 0.5, 10, ["lstm"]
        args.sample_chars, args.sample_chars_batch, args.memory_chars, args.peak_seconds = 300, 50, 3000, 0.3
    else:
        args.hidden, args.emb, args.seq_len, args.batch = 512, 64, 100, 64
        args.seconds, args.agree_steps, args.cells = 20.0, 50, ["lstm", "gru", "rnn_tanh"]
        args.sample_chars, args.sample_chars_batch, args.memory_chars, args.peak_seconds = 5000, 500, 100_000, 3.0

    steady_malloc()
    print(
        f"charrnn benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{'quick' if args.quick else 'full'} run; reference = plain fp32 PyTorch\n"
    )
    peak32 = matmul_peak(torch.float32, 1024 if args.quick else 2048, args.peak_seconds)
    peak16 = matmul_peak(torch.bfloat16, 1024 if args.quick else 2048, args.peak_seconds)
    print(f"matmul peak: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")

    if args.scale_only:
        scale_table(args, None)
    elif not args.quality_only:
        throughput_tables(args, peak16, peak32)

    if args.quality or args.quality_only:
        dtypes = args.quality_dtypes.split(",")
        q = bench_quality(args.quality_seconds, dtypes)
        r = q["ref"]
        print(
            f"\n5. quality after {args.quality_seconds} s of training each, one after the other "
            f"(full validation split, nats/char):"
        )
        print(f"   plain fp32 LSTM 2x512 script: {r['val']:.4f} ({r['steps']} steps, {r['chars_per_s']:,.0f} chars/s)")
        for dtype, run in q["runs"].items():
            print(
                f"   train.py --data shakespeare --dtype {dtype}: {run['val']:.4f} ({run['val'] / math.log(2):.3f} bpc; "
                f"{run['size']} {run['dtype']}, {run['steps']} steps, {run['wall']:.0f} s wall): "
                f"lower by {r['val'] - run['val']:+.4f}"
            )
        print(
            f"   the {dtypes[0]} model's validation split scored through the sampling step (16 segments, each from a "
            "fresh state): " + ", ".join(f"{p} {v:.5f}" for p, v in q["stepped"].items())
        )


if __name__ == "__main__":
    main()

"""The server under load, and what the state cache buys, over loopback on this machine.

    python benchmarks/serve_load.py --checkpoint checkpoints/RUN            # both parts
    python benchmarks/serve_load.py --checkpoint checkpoints/RUN --quick    # a smoke run

1. Load: ``charrnn serve`` in its own process; N clients, each streaming chat replies one
   after another for a bounded time; a prober asks ``GET /health`` every 100 ms. Reports
   the time to first character (p50, p99), characters per second per client and in
   total, errors, and the /health latencies (all within 100 ms?).
2. Cache: one conversation of T turns replayed against a server with the state cache, then
   turns 1 and T of the same conversation asked of one without (``--cache-entries 0``):
   the time to first character at turn 1 and turn T, and whether the replies agree.

The matmul peak is printed beside the absolute figures, which depend on the machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROOT, matmul_peak  # noqa: E402

HOST = "127.0.0.1"


def start_server(checkpoint: str, *flags: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "charrnn", "serve", "--checkpoint", checkpoint, "--port", "0", "--quiet", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    return proc, int(line.split(f"http://{HOST}:")[1].split()[0])


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def stream_chat(port: int, body: dict, timeout: float = 120) -> tuple[float, str]:
    """(seconds to the first character, the reply) of one streamed chat request."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        started = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        first, reply = None, []
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                text = choice["delta"].get("content")
                if text:
                    if first is None:
                        first = time.perf_counter() - started
                    reply.append(text)
        return (first if first is not None else time.perf_counter() - started), "".join(reply)
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def corpus_lines(count: int) -> list[str]:
    text = (ROOT / "data" / "shakespeare" / "input.txt").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if len(line) > 20 and not line.endswith(":")]
    return [lines[(i * 97) % len(lines)] for i in range(count)]


def bench_load(args) -> None:
    proc, port = start_server(args.checkpoint, "--max-concurrent", str(args.max_concurrent), "--max-queue", "256")
    try:
        messages = corpus_lines(args.clients)
        ttfc: list[float] = []
        chars = [0] * args.clients
        errors: list[str] = []
        health: list[float] = []
        stop_at = time.perf_counter() + args.seconds
        lock = threading.Lock()

        def client(i: int) -> None:
            seed = i * 1000
            while time.perf_counter() < stop_at:
                body = {"model": "x", "messages": [{"role": "user", "content": messages[i]}], "max_tokens": args.max_tokens}
                try:
                    first, reply = stream_chat(port, {**body, "seed": seed})
                except Exception as exc:  # counted, and the client goes on
                    with lock:
                        errors.append(str(exc)[:120])
                    continue
                seed += 1
                with lock:
                    ttfc.append(first)
                    chars[i] += len(reply)

        def prober() -> None:
            while time.perf_counter() < stop_at:
                conn = http.client.HTTPConnection(HOST, port, timeout=30)
                started = time.perf_counter()
                try:
                    conn.request("GET", "/health")
                    conn.getresponse().read()
                    health.append(time.perf_counter() - started)
                except OSError as exc:
                    errors.append(f"/health: {exc}")
                finally:
                    conn.close()
                time.sleep(0.1)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)] + [threading.Thread(target=prober)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
    finally:
        stop_server(proc)
    total = sum(chars)
    print(
        f"\n1. load: {args.clients} streaming clients for {args.seconds:g} s, {args.max_tokens} characters a reply, --max-concurrent {args.max_concurrent}"
    )
    print(f"   replies {len(ttfc)}, errors {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    if ttfc:
        print(
            f"   time to first character: p50 {1000 * percentile(ttfc, 0.5):.1f} ms, p99 {1000 * percentile(ttfc, 0.99):.1f} ms"
        )
    print(f"   characters/s: total {total / elapsed:,.0f}, per client {total / elapsed / args.clients:,.0f}")
    if health:
        within = sum(h <= 0.1 for h in health)
        print(
            f"   GET /health: {len(health)} probes, p50 {1000 * percentile(health, 0.5):.1f} ms, max {1000 * max(health):.1f} ms, "
            f"{within}/{len(health)} within 100 ms"
        )


def bench_cache(args) -> None:
    lines = corpus_lines(args.turns)
    proc, port = start_server(args.checkpoint)
    try:
        messages: list[dict] = []
        times = []
        for turn, line in enumerate(lines):
            messages.append({"role": "user", "content": line})
            first, reply = stream_chat(port, {"model": "x", "messages": messages, "max_tokens": args.reply_tokens, "seed": turn})
            messages.append({"role": "assistant", "content": reply})
            times.append(first)
    finally:
        stop_server(proc)
    prompt_chars = sum(len(m["content"]) for m in messages)
    print(
        f"   {'with the cache':<28} turn 1: {1000 * times[0]:7.1f} ms   turn {len(times)}: {1000 * times[-1]:7.1f} ms   "
        f"median of the last 10: {1000 * statistics.median(times[-10:]):7.1f} ms   (conversation: {prompt_chars:,} characters)"
    )
    # Without the cache a request costs the same whatever came before it, so only turns 1 and T
    # are asked, with the conversation the cached replay produced: each must get the same reply.
    proc, port = start_server(args.checkpoint, "--cache-entries", "0")
    try:
        uncached, same = [], True
        for turn in (0, len(lines) - 1):
            body = {"model": "x", "messages": messages[: 2 * turn + 1], "max_tokens": args.reply_tokens, "seed": turn}
            first, reply = stream_chat(port, body)
            uncached.append(first)
            same = same and reply == messages[2 * turn + 1]["content"]
    finally:
        stop_server(proc)
    print(
        f"   {'without (--cache-entries 0)':<28} turn 1: {1000 * uncached[0]:7.1f} ms   turn {len(lines)}: "
        f"{1000 * uncached[1]:7.1f} ms   (turn {len(lines)} alone, with the same conversation)"
    )
    print(f"   same replies with and without the cache: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-tokens", type=int, default=200, help="characters of each load reply")
    parser.add_argument("--max-concurrent", type=int, default=4)
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--reply-tokens", type=int, default=100, help="characters of each reply in the cache replay")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 clients for 3 s, 10 turns")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-cache", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds, args.turns = 2, 3, 10
    peak32 = matmul_peak(torch.float32, 1024, 1.0)
    peak16 = matmul_peak(torch.bfloat16, 1024, 1.0)
    print(f"matmul peak through torch: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")
    if not args.skip_load:
        bench_load(args)
    if not args.skip_cache:
        print(f"\n2. the state cache: one conversation of {args.turns} turns replayed, {args.reply_tokens} characters a reply")
        bench_cache(args)


if __name__ == "__main__":
    main()

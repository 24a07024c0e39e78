"""How long the server takes to refuse one hostile JSON body, and how /health answers meanwhile.

    python benchmarks/hostile_body.py --checkpoint checkpoints/RUN

The body is the one that once froze every client: 1 MiB of escaped quotes in an
unterminated string (``{"prompt": "\\"\\"\\"...``), which a quadratic nesting scan took
about half an hour to refuse, on the event loop. It is sent at the server's body limit;
while it is read and refused, ``GET /health`` is asked once. Prints both times, with the
machine's fp32 matmul peak beside them.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import matmul_peak  # noqa: E402

import charrnn  # noqa: E402
from charrnn.serve.settings import MIB, ServeConfig  # noqa: E402
from charrnn.serve.testing import ServerThread  # noqa: E402


def timed(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, float]:
    """(status, seconds) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    started = time.perf_counter()
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    args = parser.parse_args()
    sampler = charrnn.load(args.checkpoint, device="cpu")
    body = b'{"model": "m", "prompt": "' + b'\\"' * ((MIB - 32) // 2)
    results: dict[str, tuple[int, float]] = {}
    with ServerThread(sampler, ServeConfig(host="127.0.0.1", port=0, quiet=True, max_body_bytes=MIB)) as server:
        hostile = threading.Thread(
            target=lambda: results.setdefault("hostile", timed(server.port, "POST", "/v1/completions", body))
        )
        hostile.start()
        time.sleep(0.01)
        results["health"] = timed(server.port, "GET", "/health")
        hostile.join()
    peak = matmul_peak(torch.float32)
    (status, seconds), (health_status, health_seconds) = results["hostile"], results["health"]
    print(f"{len(body):,}-byte body of escaped quotes: {status} in {seconds:.3f} s")
    print(f"GET /health meanwhile: {health_status} in {health_seconds * 1000:.1f} ms")
    print(f"machine: fp32 matmul peak {peak:.0f} GFLOP/s")


if __name__ == "__main__":
    main()

"""The benchmark's smoke run: it runs end to end, and its correctness checks hold.

Speed is never asserted here (figures drift on a shared machine); the benchmark prints them.
"""

from __future__ import annotations

import re

from conftest import REPO, run_python


def test_quick_benchmark_prints_its_table_and_the_fast_paths_agree(subprocess_env):
    result = run_python([REPO / "benchmarks" / "bench.py", "--quick"], subprocess_env, REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for section in ("matmul peak", "1-2. training throughput", "3. sampling", "4. memory", "6. generated corpora"):
        assert section in out
    # The fp32 step function gives the reference model's logits.
    diff = float(re.search(r"max \|diff\| ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-4
    # charrnn's training path and the fp32 reference agree on the loss from the same weights and batches.
    ours, ref = map(float, re.search(r"^lstm .* (\d+\.\d{4}) +(\d+\.\d{4}) +\d+\.\d{4} +\(", out, re.M).groups())
    assert abs(ours - ref) < 0.02

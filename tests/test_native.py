"""The compiled kernel (charrnn/generation/csrc/step.cpp) against the model's own forward pass and
against the torch path's sampling rule."""

from __future__ import annotations

import fcntl
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config

import charrnn
from charrnn import ConfigError
from charrnn.config import SampleConfig
from charrnn.generation import native, toolchain
from charrnn.generation.native import BatchedStepper, NativeStepper, has_tiles, load_kernel
from charrnn.generation.processors import pick_next
from charrnn.generation.sampler import Sampler
from charrnn.model import CELL_TABLE, CharRNN, State
from charrnn.tokenizer import CharTokenizer

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


@pytest.fixture(scope="module")
def kernel():
    k = load_kernel()
    assert k is not None, "the kernel must build here: .ci/run installs g++, and make installs ninja"
    return k


def model(cell: str, layers: int = 2, hidden: int = 37, vocab: int = 23) -> CharRNN:
    """Odd sizes, so every remainder loop of the kernel runs."""
    torch.manual_seed(0)
    m = CharRNN(tiny_model_config(cell=cell, n_layers=layers, hidden_size=hidden, embedding_size=11, vocab_size=vocab)).eval()
    with torch.no_grad():  # larger weights than the initialisation, so the gates saturate somewhere
        for p in m.parameters():
            p.mul_(1 if cell == "rnn_relu" else 3)
    return m


def stepped(stepper, m: CharRNN, ids: torch.Tensor) -> torch.Tensor:
    hidden, out = m.init_hidden(ids.size(0)), []
    for t in range(ids.size(1)):
        logits, hidden = stepper.step(ids[:, t], hidden)
        out.append(logits)
    return torch.stack(out, 1)


def forward(m: CharRNN, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(ids)[0].float()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers", [1, 3])
def test_float32_kernel_equals_the_forward_pass(kernel, cell, layers):
    m = model(cell, layers)
    ids = torch.randint(23, (3, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(stepped(NativeStepper(m, "float32", kernel), m, ids), forward(m, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_the_head_keeps_its_order_when_the_vocabulary_has_as_many_rows_as_a_layer(kernel, cell, weights):
    """A vocabulary of G * H characters makes the head the shape of a layer's matrix."""
    m = model(cell, layers=1, hidden=16, vocab=CELL_TABLE[cell].gates * 16)
    ids = torch.randint(m.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(7))
    want = forward(m, ids)
    assert (stepped(NativeStepper(m, weights, kernel), m, ids) - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("cell", CELLS)
def test_int8_kernel_stays_close_to_the_forward_pass(kernel, cell):
    m = model(cell)
    ids = torch.randint(23, (2, 40), generator=torch.Generator().manual_seed(2))
    want = forward(m, ids)
    got = stepped(NativeStepper(m, "int8", kernel), m, ids)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_stepper_equals_the_forward_pass(kernel, cell, dtype):
    m = model(cell)
    ids = torch.randint(23, (9, 30), generator=torch.Generator().manual_seed(3))
    got = stepped(BatchedStepper(m, dtype, kernel, 9), m, ids)
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(got, forward(m, ids), rtol=0, atol=tolerance)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("streams", [1, 17, 40])  # partial and several 16-row blocks
def test_amx_tiles_equal_the_forward_pass_to_bfloat16_precision(kernel, cell, streams):
    if not has_tiles(kernel):
        pytest.skip("this CPU has no AMX tiles")
    m = model(cell, hidden=45)  # 45 * G outputs and 45 inputs: partial tiles both ways
    ids = torch.randint(23, (streams, 30), generator=torch.Generator().manual_seed(3))
    want = forward(m, ids)
    got = stepped(NativeStepper(m, "bfloat16", kernel), m, ids)
    assert (got - want).abs().max() < 0.02 * want.abs().max()


@pytest.mark.parametrize("weights", ["float32", "int8", "bfloat16"])
def test_a_sampling_call_keeping_only_the_last_state_ends_in_the_same_state(kernel, weights):
    if weights == "bfloat16" and not has_tiles(kernel):
        pytest.skip("this CPU has no AMX tiles")
    m = model("lstm")
    stepper = NativeStepper(m, weights, kernel)
    uniforms = torch.rand(7, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    logits, hidden = torch.randn(3, 23), m.init_hidden(3)
    tokens, state = stepper.sample(logits, hidden, uniforms, 1.0, 0, 1.0)
    last_tokens, last_state = stepper.sample(logits, hidden, uniforms, 1.0, 0, 1.0, every_state=False)
    assert torch.equal(tokens, last_tokens)
    (a, (ha, ca)), (b, (hb, cb)) = state(6), last_state(6)
    assert torch.equal(a, b) and torch.equal(ha, hb) and torch.equal(ca, cb)
    with pytest.raises(IndexError):
        last_state(5)


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=0),
        dict(temperature=1.0),
        dict(temperature=0.5, top_k=3),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=0.9, top_k=5, top_p=0.5),
    ],
)
def test_kernel_picks_by_the_same_rule_as_torch(kernel, options):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(500, 23, generator=g) * 3
    logits[:, 7] = logits[:, 3]  # a tie
    uniforms = torch.rand(500, generator=g, dtype=torch.float64)
    config = SampleConfig(**options)
    want = pick_next(logits, config, uniforms)
    got = kernel.pick(logits, uniforms, config.temperature, config.top_k, config.top_p)
    assert (got == want).float().mean() > 0.995  # float32 against float64 sums may split a hair's-breadth draw


def test_kernel_picks_follow_the_probabilities(kernel):
    """Evenly spaced uniforms hit each character in proportion to its probability."""
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, -30.0]])
    n = 20000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    picks = torch.stack([kernel.pick(logits, u[None], 1.0, 0, 1.0) for u in uniforms])
    counts = torch.bincount(picks.flatten(), minlength=5).double() / n
    torch.testing.assert_close(counts, torch.softmax(logits[0].double(), 0), rtol=0, atol=1e-3)


@pytest.mark.parametrize("stepper", ["int8", "float32", "bfloat16", "batched"])
def test_the_kernel_refuses_token_ids_outside_the_vocabulary(kernel, stepper):
    if stepper == "bfloat16" and not has_tiles(kernel):
        pytest.skip("this CPU has no AMX tiles")
    m = model("lstm")
    s = BatchedStepper(m, torch.bfloat16, kernel, 2) if stepper == "batched" else NativeStepper(m, stepper, kernel)
    for bad in ([3, 23], [-1, 0], [10**12, 0]):
        with pytest.raises(RuntimeError, match=r"token ids must be in \[0, 23\)"):
            s.step(torch.tensor(bad), m.init_hidden(2))


def test_the_kernel_refuses_a_hidden_state_of_another_shape(kernel):
    m = model("lstm")
    h, c = model("lstm", hidden=20).init_hidden(2)
    with pytest.raises(RuntimeError, match=r"hidden state must be contiguous float32 \(2, B, 37\)"):
        NativeStepper(m, "int8", kernel).step(torch.tensor([1, 2]), State(h, c))


@pytest.mark.parametrize("cell", CELLS)
def test_the_kernel_takes_the_gate_counts_from_the_cell_table_and_refuses_a_wrong_one(kernel, cell, monkeypatch):
    row = CELL_TABLE[cell]
    m = model(cell)
    with torch.no_grad():  # what the table says is what the kernel runs
        NativeStepper(m, "float32", kernel).step(torch.tensor([1, 2]), m.init_hidden(2))
    h = torch.zeros(2, 2, 37)
    gx, empty = torch.zeros(2, row.gates * 37), torch.empty(0)
    for gates, has_c in ((row.gates + 1, row.has_cell_state), (row.gates, not row.has_cell_state)):
        with pytest.raises(RuntimeError, match="charrnn.model.CELL_TABLE and cell_update disagree"):
            kernel.cell(row.kernel_id, gates, has_c, gx, gx, h, h, 0, h, h, empty, empty)
    # Through a stepper: the row is read when the weights are packed.
    monkeypatch.setitem(CELL_TABLE, cell, replace(row, has_cell_state=not row.has_cell_state))
    with pytest.raises(RuntimeError, match="charrnn.model.CELL_TABLE and cell_update disagree"):
        NativeStepper(m, "float32", kernel)
    with pytest.raises(RuntimeError, match="kernel_id 9 names no arithmetic"):
        kernel.cell(9, row.gates, row.has_cell_state, gx, gx, h, h, 0, h, h, empty, empty)


def test_sampling_in_the_kernel_equals_stepping_and_picking(kernel):
    m = model("lstm")
    stepper = NativeStepper(m, "float32", kernel)
    uniforms = torch.rand(30, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    logits, hidden = torch.randn(2, 23), m.init_hidden(2)
    tokens, state = stepper.sample(logits, hidden, uniforms, 0.8, 0, 1.0)
    for j, u in enumerate(uniforms):
        token = kernel.pick(logits, u, 0.8, 0, 1.0)
        logits, hidden = stepper.step(token, hidden)
        assert torch.equal(tokens[j], token)
        after_logits, after_hidden = state(j)
        assert torch.equal(after_logits, logits) and all(torch.equal(a, b) for a, b in zip(after_hidden, hidden))


def test_without_a_compiler_sampling_falls_back_to_torch_with_one_warning(monkeypatch):
    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension: g++: command not found")

    monkeypatch.setattr(native, "_kernel", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    m = model("gru")
    with pytest.warns(UserWarning, match="could not be built .*g\\+\\+: command not found.*Install a C\\+\\+ compiler"):
        sampler = Sampler(m, CharTokenizer([chr(97 + i) for i in range(22)]))
    text = sampler.generate("abc", length=30, seed=1)
    assert len(text) == 30 and sampler.generate("abc", length=30, seed=1) == text
    with pytest.raises(ConfigError, match="int8 sampling runs on charrnn's CPU kernel, which is not available"):
        Sampler(m, sampler.tokenizer, dtype=torch.int8).generate("abc", length=3)


def test_a_build_lock_left_by_a_killed_build_is_removed_not_waited_on(monkeypatch, tmp_path, capsys):
    """torch waits for its build lock forever; one left by a killed build must not hang sampling."""
    monkeypatch.setattr(native, "_kernel", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = tmp_path / f"charrnn_step_{native._cpu_signature()}"
    build.mkdir()
    lock = build / "lock"
    lock.touch()  # however young: no live build holds charrnn's own lock
    loaded = object()

    def fake_load(**kwargs):
        assert not lock.exists(), "the stale lock must be gone before torch looks for it"
        return loaded

    monkeypatch.setattr("torch.utils.cpp_extension.load", fake_load)
    assert native.load_kernel() is loaded
    assert "removed the lock of a build that was killed" in capsys.readouterr().err


def test_the_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("CHARRNN_KERNEL", "off")
    assert load_kernel() is None
    sampler = Sampler(model("lstm"), CharTokenizer([chr(97 + i) for i in range(22)]))
    assert type(sampler.stepper(1)).__name__ == "Stepper"


def test_lower_precisions_cost_almost_nothing_in_validation_loss(trained_run, corpus_file):
    """Scored through the sampling step, int8 and bfloat16 weights stay within 0.01 nats of float32."""
    text = corpus_file.read_text(encoding="utf-8")
    val = text[int(len(text) * 0.9) :]
    exact = charrnn.load(trained_run.best, device="cpu", dtype="float32")
    reference = exact.score(val, stepped=True)
    assert abs(reference - exact.score(val)) < 0.05  # fresh states per segment cost a little context
    for precision in ("int8", "bfloat16"):
        sampler = charrnn.Sampler(exact.model, exact.tokenizer, dtype=precision)
        assert abs(sampler.score(val, stepped=True) - reference) < 0.01, precision


# --- building and loading the kernel ----------------------------------------------------------------


def _fresh_kernel_state(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_kernel", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return tmp_path / f"charrnn_step_{native._cpu_signature()}"


def test_a_built_kernel_in_a_read_only_cache_is_loaded_not_given_up(kernel, monkeypatch):
    build = Path(kernel.__file__).parent  # the real cache: the library loaded there is the one to find
    _fresh_kernel_state(monkeypatch, build.parent)
    saved_mode = build.stat().st_mode
    build.chmod(0o555)
    real_open = open

    def read_only_open(file, mode="r", *args, **kwargs):  # root ignores the mode bits: refuse writes here
        if str(file).startswith(str(build)) and any(m in mode for m in "wax+"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(native, "open", read_only_open, raising=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            loaded = native.load_kernel()
    finally:
        build.chmod(saved_mode)
    assert loaded is not None and hasattr(loaded, "Packed")


def test_a_failed_build_with_a_compiler_present_does_not_say_install_a_compiler(monkeypatch, tmp_path):
    _fresh_kernel_state(monkeypatch, tmp_path)

    def failing(**kwargs):
        raise RuntimeError("step.cpp:12: error: expected ';' before '}' token")

    monkeypatch.setattr("torch.utils.cpp_extension.load", failing)
    monkeypatch.setattr(native.shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.warns(UserWarning, match="could not be built .*expected ';'") as caught:
        assert native.load_kernel() is None
    message = next(str(w.message) for w in caught if "could not be built" in str(w.message))
    assert "Install a C++ compiler" not in message and "CHARRNN_KERNEL=off" in message


def test_a_process_waiting_for_another_build_says_so(monkeypatch, tmp_path, capsys):
    build = _fresh_kernel_state(monkeypatch, tmp_path)
    build.mkdir()
    holder = open(build / "charrnn.lock", "w")
    fcntl.flock(holder, fcntl.LOCK_EX)  # "another process" is building
    entered = threading.Event()

    def wait_for_the_lock():
        with native._build_lock(build):
            entered.set()

    thread = threading.Thread(target=wait_for_the_lock)
    thread.start()
    deadline = time.monotonic() + 10
    while "waiting for another process" not in capsys.readouterr().err and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not entered.is_set()
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    thread.join(10)
    assert entered.is_set()
    assert time.monotonic() < deadline, "no word that it waits"


def test_threads_loading_the_kernel_at_once_build_it_once(monkeypatch, tmp_path):
    _fresh_kernel_state(monkeypatch, tmp_path)
    calls = []
    loaded = object()

    def slow_load(**kwargs):
        calls.append(1)
        time.sleep(0.2)
        return loaded

    monkeypatch.setattr("torch.utils.cpp_extension.load", slow_load)
    results = []
    threads = [threading.Thread(target=lambda: results.append(native.load_kernel())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [loaded] * 4 and len(calls) == 1


def test_a_batched_stepper_is_cached_per_stream_count(kernel):
    if has_tiles(kernel):
        pytest.skip("with AMX tiles, batches run on the tile stepper, which is not packed per count")
    sampler = Sampler(model("lstm"), CharTokenizer([chr(97 + i) for i in range(22)]), dtype="bfloat16")
    small, large = sampler.stepper(8), sampler.stepper(64)
    assert isinstance(small, BatchedStepper) and isinstance(large, BatchedStepper)
    assert (small.batch, large.batch) == (8, 64)
    assert sampler.stepper(8) is small


# --- the compiler and its flags ----------------------------------------------------------------------

VERSIONS = {
    "g++ (Debian 14.2.0-19) 14.2.0\nCopyright (C) 2024 Free Software Foundation, Inc.": "gcc",
    "Debian clang version 19.1.7 (3+b1)\nTarget: x86_64-pc-linux-gnu": "clang",
    "Apple clang version 16.0.0 (clang-1600.0.26.6)\nTarget: arm64-apple-darwin24.3.0": "apple-clang",
    "Homebrew clang version 19.1.7\nTarget: arm64-apple-darwin24.3.0": "clang",
}


@pytest.mark.parametrize(("version", "family"), VERSIONS.items())
def test_the_compiler_family_is_read_from_its_version(version, family):
    assert toolchain.compiler_family(version) == family


def test_the_flags_follow_the_compiler_and_the_machine():
    assert toolchain.base_flags("gcc", "x86_64") == ["-O3", "-ffast-math", "-march=native", "-mprefer-vector-width=512"]
    assert toolchain.base_flags("clang", "aarch64") == ["-O3", "-ffast-math", "-mcpu=native"]
    assert toolchain.base_flags("apple-clang", "arm64") == ["-O3", "-ffast-math"]  # its default target is the chip itself
    assert toolchain.base_flags("msvc", "AMD64") == ["/O2", "/fp:fast", "/arch:AVX2"]
    assert toolchain.openmp_candidates("gcc") == [(["-fopenmp"], ["-fopenmp"])]
    assert toolchain.openmp_candidates("msvc") == [(["/openmp"], [])]


def test_apple_clang_takes_openmp_from_libomp_where_it_is_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(toolchain, "LIBOMP_PREFIXES", ())
    assert toolchain.openmp_candidates("apple-clang") == []  # no libomp: single-threaded, never a failed build
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "omp.h").touch()
    monkeypatch.setenv("LIBOMP_PREFIX", str(tmp_path))
    assert toolchain.openmp_candidates("apple-clang") == [
        (["-Xpreprocessor", "-fopenmp", f"-I{tmp_path}/include"], [f"-L{tmp_path}/lib", "-lomp"])
    ]


def test_without_openmp_the_flags_are_single_threaded(monkeypatch):
    gcc = toolchain.find_compiler()
    assert gcc is not None and gcc.family == "gcc"
    assert toolchain.kernel_flags(gcc).openmp and "-fopenmp" in toolchain.kernel_flags(gcc).cflags
    monkeypatch.setattr(toolchain, "compiles", lambda *args: False)
    flags = toolchain.kernel_flags(gcc)
    assert not flags.openmp and "-fopenmp-simd" in flags.cflags and flags.ldflags == []


KERNEL_PROBE = """
import sys, charrnn
from charrnn.generation.native import load_kernel
sampler = charrnn.load(sys.argv[1], device="cpu", dtype="float32")
kernel = load_kernel()
text = open(sys.argv[2], encoding="utf-8").read()[:3000]
print(type(sampler.stepper(1)).__name__ if kernel else "none", sampler.score(text, stepped=True))
"""


def _probe_kernel(trained_run, corpus_file, tmp_path, env_changes):
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "OMP_NUM_THREADS": "1", **env_changes}
    result = subprocess.run(
        [sys.executable, "-c", KERNEL_PROBE, str(trained_run.best), str(corpus_file)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    stepper, score = result.stdout.split()
    return stepper, float(score), result.stderr


def test_a_compiler_without_openmp_builds_a_single_threaded_kernel_that_samples_alike(kernel, trained_run, corpus_file, tmp_path):
    """g++ behind a wrapper that refuses -fopenmp: the kernel still builds, and scores as the usual one does."""
    import shutil

    wrapper = tmp_path / "c++"
    gxx = shutil.which("g++")
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {gxx} "$@"\n')
    wrapper.chmod(0o755)
    stepper, score, err = _probe_kernel(trained_run, corpus_file, tmp_path, {"CXX": str(wrapper)})
    assert stepper == "NativeStepper" and "has no OpenMP here, so the kernel is built single-threaded" in err
    text = corpus_file.read_text(encoding="utf-8")[:3000]
    usual = charrnn.load(trained_run.best, device="cpu", dtype="float32").score(text, stepped=True)
    assert score == pytest.approx(usual, abs=1e-4)


def test_with_no_compiler_on_path_sampling_says_so_once_and_uses_torch(trained_run, corpus_file, tmp_path):
    stepper, score, err = _probe_kernel(trained_run, corpus_file, tmp_path, {"CXX": "no-such-compiler", "PATH": "/nonexistent"})
    assert stepper == "none" and score > 0
    lines = [line for line in err.splitlines() if "could not be built" in line]
    assert len(lines) == 1 and "no C++ compiler found" in lines[0] and "Install a C++ compiler" in lines[0]


def test_clang_builds_the_kernel_and_it_scores_as_gccs_does(kernel, trained_run, corpus_file, tmp_path):
    import shutil

    clang = shutil.which("clang++")
    assert clang is not None, "clang++ is missing: .ci/run installs Debian's clang (apt-get install clang libomp-dev)"
    stepper, score, err = _probe_kernel(trained_run, corpus_file, tmp_path, {"CXX": clang})
    assert stepper == "NativeStepper", err
    text = corpus_file.read_text(encoding="utf-8")[:3000]
    usual = charrnn.load(trained_run.best, device="cpu", dtype="float32").score(text, stepped=True)
    assert score == pytest.approx(usual, abs=1e-4)

"""charrnn's compiled sampling kernel (``csrc/step.cpp``) and the steppers built on it.

- :class:`NativeStepper` runs a whole sampling loop in one call of the kernel: over
  float32 or int8 weight rows (one or a few streams), or over AMX tiles (batches).
- :class:`BatchedStepper` is for batches on CPUs without AMX: oneDNN products on weights
  packed once, each layer's cell and the sampling picks in the kernel.

Both have the ``step(tokens, state)`` of :class:`~charrnn.generation.stepper.Stepper`, and a
``sample`` that draws K characters. The kernel is compiled on first use for the
machine's own instruction set (about 30 s, cached under ``~/.cache/torch_extensions``
or ``$TORCH_EXTENSIONS_DIR``); where it cannot be built, ``load_kernel`` says why once
and sampling runs on the torch ops of ``charrnn.generation.stepper``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from filelock import Timeout

from .._io import os_lock
from ..model import CELL_TABLE, CharRNN, State
from .stepper import StateAfter, Weights, run_steps
from .toolchain import KernelFlags, find_compiler, kernel_flags, no_openmp_hint

SOURCE = Path(__file__).parent / "csrc" / "step.cpp"
FLAGS_FILE = "charrnn-flags.json"  # beside a built kernel: the flags it was built with
_kernel: ModuleType | None = None
_failure: str | None = None
_load_lock = threading.Lock()


def _cpu_signature() -> str:
    """What ``-march=native`` depends on, so a cache shared by two machines never mixes binaries."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next(line for line in info if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(f"{platform.machine()}{flags}{torch.__version__}".encode()).hexdigest()[:12]


def _cache_root() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))


def _writable(folder: Path) -> bool:
    """Whether charrnn may write in ``folder``: allowed by the OS and by its mode bits (root ignores
    the bits, but a folder made read-only is meant to stay as it is)."""
    try:
        return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def _saved_flags(build: Path) -> KernelFlags | None:
    """The flags the kernel in ``build`` was built with (None: not recorded, or unreadable)."""
    try:
        saved = json.loads((build / FLAGS_FILE).read_text())
        return KernelFlags(list(saved["cflags"]), list(saved["ldflags"]), bool(saved["openmp"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_flags(build: Path, flags: KernelFlags) -> None:
    with contextlib.suppress(OSError):  # a read-only cache: the next start chooses them again
        (build / FLAGS_FILE).write_text(json.dumps(dataclasses.asdict(flags)))


def _import_built(name: str, library: Path) -> ModuleType:
    """Import an already built kernel without touching its folder (no ninja, no lock files)."""
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"{library} is not a loadable extension")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hint(build: Path, failure: str) -> str:
    """What to do about a failed build: the fix for the cause that the error or the machine shows."""
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++", "cl"]
    if "command not found" in failure or "no C++ compiler" in failure or not any(c and shutil.which(c) for c in compilers):
        return (
            "Install a C++ compiler to get it (g++ or clang; on macOS `xcode-select --install`; on Windows the "
            "Build Tools for Visual Studio)"
        )
    if "ninja is required" in failure.lower():
        return "Install ninja (pip install ninja) to get it"
    if not _writable(build.parent if not build.exists() else build):
        return f"Make {build} writable, or point TORCH_EXTENSIONS_DIR at a writable folder, to get it"
    return "The compiler's message is above; CHARRNN_KERNEL=off silences this warning"


def load_kernel() -> ModuleType | None:
    """The compiled kernel, building it on first use; None (with one warning) if it cannot be built.

    ``CHARRNN_KERNEL=off`` in the environment turns it off: everything then runs on torch ops.
    A built kernel in a read-only cache is loaded as it is. Threads share one build.
    """
    global _kernel, _failure
    if os.environ.get("CHARRNN_KERNEL", "").lower() == "off":
        return None
    with _load_lock:  # the first callers of several threads wait for one build, not start one each
        if _kernel is not None or _failure is not None:
            return _kernel
        name = f"charrnn_step_{_cpu_signature()}"
        build = _cache_root() / name
        try:
            library = build / f"{name}.so"
            if library.is_file() and not _writable(build):
                _kernel = _import_built(name, library)
                return _kernel
            from torch.utils.cpp_extension import load

            compiler = find_compiler()
            if compiler is None:
                raise RuntimeError(f"no C++ compiler found: {os.environ.get('CXX') or 'c++'} is not on PATH")
            build.mkdir(parents=True, exist_ok=True)
            with _build_lock(build):
                # torch's builder rebuilds when the flags change: a built kernel is loaded with the flags it was built with.
                flags = _saved_flags(build) if any(build.glob("*.so")) else None
                if flags is None:
                    print("charrnn: compiling the sampling kernel for this CPU (once; about 30 s)", file=sys.stderr, flush=True)
                    flags = kernel_flags(compiler)
                    if not flags.openmp:
                        print(
                            f"charrnn: {compiler.version or compiler.command} has no OpenMP here, so the kernel is built "
                            f"single-threaded (batches sample slower; one stream does not): {no_openmp_hint(compiler)}",
                            file=sys.stderr,
                            flush=True,
                        )
                _kernel = load(
                    name=name,
                    sources=[str(SOURCE)],
                    extra_cflags=flags.cflags,
                    extra_ldflags=flags.ldflags,
                    build_directory=str(build),
                )
                _save_flags(build, flags)
        except Exception as error:  # no compiler, no ninja, a failed build: fall back, say why once
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            _failure = "; ".join(([line for line in lines if "error" in line.lower()] or lines or [type(error).__name__])[:3])
            warnings.warn(
                f"charrnn's sampling kernel could not be built ({_failure}); sampling uses the slower torch step. {_hint(build, _failure)}.",
                stacklevel=3,
            )
    return _kernel


@contextlib.contextmanager
def _build_lock(build: Path) -> Iterator[None]:
    """Hold charrnn's own lock on the build folder, and clear torch's if a killed build left it.

    torch waits without end for its lock file (``lock``) while another process builds,
    and a build killed outright leaves the file behind, so every later start would hang.
    Every charrnn process takes this lock first, and the OS releases it when its holder
    dies: whoever holds it knows that no build is running, and that a ``lock`` file is stale.
    A process that has to wait says so, rather than hang without a word. The lock is
    ``charrnn._io.os_lock``.
    """
    lock = os_lock(build / "charrnn.lock")
    if lock is None:  # no OS lock here: torch's own lock file is all there is
        yield
        return
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not any(build.glob("*.so")):  # built already: the holder only checks it, a moment's wait
            print(
                f"charrnn: waiting for another process that is compiling the sampling kernel in {build}",
                file=sys.stderr,
                flush=True,
            )
        lock.acquire()
    try:
        stale = build / "lock"
        if stale.exists():
            stale.unlink()
            print(f"charrnn: removed the lock of a build that was killed: {stale}", file=sys.stderr, flush=True)
        yield
    finally:
        lock.release()


def has_tiles(kernel: ModuleType | None) -> bool:
    """True where the kernel was built with AMX tiles (the CPU has them) and the OS lets us use them."""
    return kernel is not None and hasattr(kernel, "TilePacked") and kernel.tiles_usable()


def _unit_major(w: torch.Tensor, gates: int) -> torch.Tensor:
    """Rows (or a bias) from torch's gate-major order (g * H + u) to unit-major (u * G + g)."""
    hidden = w.shape[0] // gates
    return w.reshape(gates, hidden, *w.shape[1:]).transpose(0, 1).reshape(w.shape).contiguous()


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows and their float scales, each row symmetric: w ~= q * scale[:, None]."""
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.float().contiguous()


def _cell_args(cell: str) -> tuple[int, int, bool]:
    """What the kernel is told of a cell, from the cell table: the arithmetic it runs, the
    gate count and whether a cell state exists (it checks the three agree)."""
    row = CELL_TABLE[cell]
    return row.kernel_id, row.gates, row.has_cell_state


class NativeStepper:
    """A step and a sampling loop that run whole in the kernel, over weights packed for it.

    ``weights`` is how the products run:

    - ``float32``: exact, rows in unit-major order (a unit's gates side by side);
    - ``int8``: the same rows quantized, one scale each (a quarter of the bytes to read);
    - ``bfloat16``: AMX tiles, for batches (only where the CPU has AMX: ``has_tiles``).
    """

    def __init__(self, model: CharRNN, weights: str, kernel: ModuleType):
        cfg = model.config
        self.kernel, self.cell = kernel, cfg.cell
        self.dtype = {"float32": torch.float32, "int8": torch.int8, "bfloat16": torch.bfloat16}[weights]
        w, cell = Weights(model), _cell_args(cfg.cell)
        if weights == "bfloat16":
            self.packed = kernel.TilePacked(*cell, w.table0, w.w_x, w.b_x, w.w_h, w.b_h, w.w_o, w.b_o)
            return
        G, empty = CELL_TABLE[cfg.cell].gates, torch.empty(0)

        def rows(m: torch.Tensor, gates: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Rows in unit-major order (for ``gates`` rows per unit); int8 with scales, or float32 and no scales."""
            m = _unit_major(m, gates) if m.numel() else m
            return quantize_rows(m) if weights == "int8" and m.numel() else (m, empty)

        x, h = [rows(m, G) for m in w.w_x], [rows(m, G) for m in w.w_h]
        head = rows(w.w_o, 1)  # one row per character: the order stays
        self.packed = kernel.Packed(
            *cell, _unit_major(w.table0.T, G).T.contiguous(),
            [m for m, _ in x], [s for _, s in x], [_unit_major(b, G) if b.numel() else b for b in w.b_x],
            [m for m, _ in h], [s for _, s in h], [_unit_major(b, G) if b.numel() else b for b in w.b_h],
            head[0], head[1], w.b_o,
        )  # fmt: skip

    def step(self, tokens: torch.Tensor, hidden: State) -> tuple[torch.Tensor, State]:
        """tokens (B,) int64 and the state before them -> float32 logits (B, V) and the new state."""
        logits, h, c = self.kernel.step(self.packed, tokens.contiguous(), *hidden.kernel_form())
        return logits, State.from_kernel(h, c)

    def sample(
        self,
        logits: torch.Tensor,
        hidden: State,
        uniforms: torch.Tensor,
        temperature: float,
        top_k: int,
        top_p: float,
        every_state: bool = True,
    ) -> tuple[torch.Tensor, StateAfter]:
        """K characters per stream from the state before them, each drawn with its uniform
        (``uniforms``, (K, B)) as ``charrnn.generation.processors.pick_next`` draws it; the loop runs in the kernel.

        Returns the tokens (K, B) and ``state(j)``: the logits and hidden state right after
        token j; without ``every_state``, only after the last one (j = K - 1).
        """
        h, c = hidden.kernel_form()
        tokens, logits_seq, h_seq, c_seq = self.kernel.sample(
            self.packed, logits.float().contiguous(), h, c, uniforms.contiguous(), temperature, top_k, top_p, every_state
        )
        slots = len(logits_seq)

        def state(j: int) -> tuple[torch.Tensor, State]:
            if not every_state and j != len(tokens) - 1:
                raise IndexError("only the state after the last token was kept")
            i = j % slots
            return logits_seq[i], State.from_kernel(h_seq[i], c_seq[i])  # c_seq (S, 0) for cells without c

        return tokens, state


class _Product:
    """x @ w.T + bias in ``dtype``, with bfloat16 weights packed once into oneDNN's blocked layout.

    Packing is what makes small-batch bfloat16 products fast on AMX: unpacked, oneDNN
    reorders the weights on every call (about 40% of a 64-stream step).
    """

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, batch: int):
        self.dtype = dtype
        self.bias = bias.to(dtype) if bias is not None else None
        self.w = w.to(dtype).contiguous()
        self.packed = False
        if dtype == torch.bfloat16:
            try:
                self.w = torch.ops.mkldnn._reorder_linear_weight(self.w, batch)
                self.packed = True
            except (AttributeError, RuntimeError):  # a torch without oneDNN: plain products
                pass

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.w, self.bias, "none", [], "")
        return torch.nn.functional.linear(x, self.w, self.bias)


class BatchedStepper:
    """Many streams on a CPU: batched matrix products (bfloat16 on AMX / AVX512-BF16) and,
    per layer, one fused call for the cell; sampling in the kernel too.

    As in :class:`~charrnn.generation.stepper.Stepper`, state and gate arithmetic stay float32.
    """

    def __init__(self, model: CharRNN, dtype: torch.dtype, kernel: ModuleType, batch: int):
        self.kernel, self.cell, self.dtype = kernel, _cell_args(model.config.cell), dtype
        self.batch = batch  # the stream count its bfloat16 weights are packed for
        w = Weights(model)
        self.table0 = w.table0
        self.x_products = [None] + [_Product(m, b, dtype, batch) for m, b in zip(w.w_x[1:], w.b_x[1:])]
        self.h_products = [_Product(m, b if b.numel() else None, dtype, batch) for m, b in zip(w.w_h, w.b_h)]
        self.no_tokens = torch.empty(0, dtype=torch.long)
        self.head = _Product(w.w_o, w.b_o, dtype, batch)

    def step(self, tokens: torch.Tensor, hidden: State) -> tuple[torch.Tensor, State]:
        """tokens (B,) int64 and the state before them -> float32 logits (B, V) and the new state."""
        h, c = hidden.kernel_form()
        h_out, c_out = torch.empty_like(h), torch.empty_like(c)
        # bfloat16 products take the layer below's output as the cell wrote it, in bfloat16.
        x = torch.empty(h.shape[1:], dtype=torch.bfloat16) if self.dtype == torch.bfloat16 else torch.empty(0)
        for layer, (x_product, h_product) in enumerate(zip(self.x_products, self.h_products)):
            if layer == 0:  # the kernel gathers layer 0's input products from the table by token
                gx, rows = self.table0, tokens.contiguous()
            else:
                gx, rows = x_product(x if x.numel() else h_out[layer - 1]), self.no_tokens
            self.kernel.cell(*self.cell, gx, h_product(h[layer]), h, c, layer, h_out, c_out, rows, x)
        x = x if x.numel() else h_out[-1]
        return self.head(x).float(), State.from_kernel(h_out, c_out)

    def sample(
        self,
        logits: torch.Tensor,
        hidden: State,
        uniforms: torch.Tensor,
        temperature: float,
        top_k: int,
        top_p: float,
        every_state: bool = True,
    ) -> tuple[torch.Tensor, StateAfter]:
        """As :meth:`NativeStepper.sample`; the loop runs here, each pick in the kernel."""

        def pick(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            return self.kernel.pick(logits.float().contiguous(), u.contiguous(), temperature, top_k, top_p)

        return run_steps(self.step, pick, logits, hidden, uniforms, every_state)

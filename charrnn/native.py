"""The fused C++ step (``csrc/step.cpp``): built once per machine, then loaded from cache.

``NativeStepper`` has the same ``step(tokens, hidden)`` as :class:`~charrnn.stepper.Stepper`
and is what one or a few streams sample with on a CPU. The kernel is compiled on first
use with the machine's own instruction set (about 30 s, cached under
``~/.cache/torch_extensions``); when no compiler is found, ``load_kernel`` says why and
the torch step is used instead.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path
from collections.abc import Callable
from types import ModuleType

import torch

from .model import CharRNN, Hidden
from .stepper import GATES

SOURCE = Path(__file__).parent / "csrc" / "step.cpp"
StateAfter = Callable[[int], tuple[torch.Tensor, Hidden]]  # j -> logits and hidden right after token j
CELLS = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
_kernel: ModuleType | None = None
_failure: str | None = None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on, so a cache shared by two machines never mixes binaries."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(f"{platform.machine()}{flags}{torch.__version__}".encode()).hexdigest()[:12]


def load_kernel() -> ModuleType | None:
    """The compiled kernel, building it on first use; None (with one warning) if it cannot be built.

    ``CHARRNN_KERNEL=off`` in the environment turns it off: everything then runs on torch ops.
    """
    global _kernel, _failure
    if os.environ.get("CHARRNN_KERNEL", "").lower() == "off":
        return None
    if _kernel is not None or _failure is not None:
        return _kernel
    try:
        from torch.utils.cpp_extension import load

        flags = ["-O3", "-fopenmp", "-ffast-math"] + (["-march=native", "-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"])
        _kernel = load(
            name=f"charrnn_step_{_cpu_signature()}",
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
        )
    except Exception as error:  # no compiler, no ninja, a failed build: fall back, say why once
        _failure = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        warnings.warn(
            f"charrnn's fused sampling kernel could not be built ({_failure}); sampling uses the slower torch "
            "step. Install a C++ compiler (g++ or clang) and ninja to get it.",
            stacklevel=2,
        )
    return _kernel


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


class NativeStepper:
    """The fused step over weights packed for it: float32 (exact) or int8 rows (``quantized``)."""

    def __init__(self, model: CharRNN, quantized: bool, kernel: ModuleType):
        cfg = model.config
        self.kernel, self.cell = kernel, cfg.cell
        self.dtype = torch.int8 if quantized else torch.float32
        G = GATES[cfg.cell]
        rnn = model.rnn
        empty = torch.empty(0)

        def p(name: str, layer: int) -> torch.Tensor:
            return getattr(rnn, f"{name}_l{layer}").detach().float().cpu()

        def pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            w = _unit_major(w, G) if w.shape[0] == G * cfg.hidden_size else w.contiguous()
            return quantize_rows(w) if quantized else (w, empty)

        # As in Stepper: the input-side bias holds b_hh too, except for GRU, whose n gate needs it apart.
        gru = cfg.cell == "gru"
        x_bias = [p("bias_ih", l) + (0 if gru else p("bias_hh", l)) for l in range(cfg.n_layers)]
        table0 = model.embedding.weight.detach().float().cpu() @ p("weight_ih", 0).T + x_bias[0]
        table0 = _unit_major(table0.T, G).T.contiguous()
        w_x, s_x, b_x = [empty], [empty], [empty]  # layer 0 reads the table instead
        w_h, s_h, b_h = [], [], []
        for l in range(cfg.n_layers):
            if l:
                w, s = pack(p("weight_ih", l))
                w_x.append(w), s_x.append(s), b_x.append(_unit_major(x_bias[l], G))
            w, s = pack(p("weight_hh", l))
            w_h.append(w), s_h.append(s), b_h.append(_unit_major(p("bias_hh", l), G) if gru else empty)
        w_o, s_o = pack(model.head.weight.detach().float().cpu())
        b_o = model.head.bias.detach().float().cpu().contiguous()
        self.packed = kernel.Packed(CELLS[cfg.cell], table0, w_x, s_x, b_x, w_h, s_h, b_h, w_o, s_o, b_o)

    def step(self, tokens: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        """tokens (B,) int64, hidden as from ``CharRNN`` -> float32 logits (B, V) and the new hidden."""
        h, c = self._split(hidden)
        logits, h, c = self.kernel.step(self.packed, tokens.contiguous(), h, c)
        return logits, self._join(h, c)

    def sample(self, logits: torch.Tensor, hidden: Hidden, uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float) -> tuple[torch.Tensor, StateAfter]:
        """K characters per stream from the state before them, each drawn with its uniform
        (``uniforms``, (K, B)) as ``charrnn.sampling.pick_next`` draws it; the loop runs in the kernel.

        Returns the tokens (K, B) and ``state(j)``: the logits and hidden state right after token j.
        """
        h, c = self._split(hidden)
        tokens, logits_seq, h_seq, c_seq = self.kernel.sample(self.packed, logits.float().contiguous(), h, c, uniforms.contiguous(), temperature, top_k, top_p)
        if self.cell == "lstm":
            return tokens, lambda j: (logits_seq[j], (h_seq[j], c_seq[j]))
        return tokens, lambda j: (logits_seq[j], h_seq[j])

    def _split(self, hidden: Hidden) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = hidden if self.cell == "lstm" else (hidden, torch.empty(0))
        return h.float().contiguous(), c.float().contiguous()

    def _join(self, h: torch.Tensor, c: torch.Tensor) -> Hidden:
        return (h, c) if self.cell == "lstm" else h


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

    As in :class:`~charrnn.stepper.Stepper`, state and gate arithmetic stay float32.
    """

    def __init__(self, model: CharRNN, dtype: torch.dtype, kernel: ModuleType, batch: int):
        cfg = model.config
        self.kernel, self.cell, self.dtype = kernel, cfg.cell, dtype
        rnn = model.rnn
        gru = cfg.cell == "gru"

        def p(name: str, layer: int) -> torch.Tensor:
            return getattr(rnn, f"{name}_l{layer}").detach().float().cpu()

        x_bias = [p("bias_ih", l) + (0 if gru else p("bias_hh", l)) for l in range(cfg.n_layers)]
        self.table0 = model.embedding.weight.detach().float().cpu() @ p("weight_ih", 0).T + x_bias[0]
        self.x_products = [None] + [_Product(p("weight_ih", l), x_bias[l], dtype, batch) for l in range(1, cfg.n_layers)]
        self.h_products = [_Product(p("weight_hh", l), p("bias_hh", l) if gru else None, dtype, batch) for l in range(cfg.n_layers)]
        self.no_tokens = torch.empty(0, dtype=torch.long)
        self.head = _Product(model.head.weight.detach().float().cpu(), model.head.bias.detach().float().cpu(), dtype, batch)

    def step(self, tokens: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        """tokens (B,) int64, hidden as from ``CharRNN`` -> float32 logits (B, V) and the new hidden."""
        lstm = self.cell == "lstm"
        h, c = hidden if lstm else (hidden, torch.empty(0))
        h, c = h.float().contiguous(), c.float().contiguous()
        h_out, c_out = torch.empty_like(h), torch.empty_like(c)
        # bfloat16 products take the layer below's output as the cell wrote it, in bfloat16.
        x = torch.empty(h.shape[1:], dtype=torch.bfloat16) if self.dtype == torch.bfloat16 else torch.empty(0)
        for layer, (x_product, h_product) in enumerate(zip(self.x_products, self.h_products)):
            gx, rows = (self.table0, tokens.contiguous()) if layer == 0 else (x_product(x if x.numel() else h_out[layer - 1]), self.no_tokens)
            self.kernel.cell(CELLS[self.cell], gx, h_product(h[layer]), h, c, layer, h_out, c_out, rows, x)
        x = x if x.numel() else h_out[-1]
        logits = self.head(x).float()
        return logits, ((h_out, c_out) if lstm else h_out)

    def sample(self, logits: torch.Tensor, hidden: Hidden, uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float) -> tuple[torch.Tensor, StateAfter]:
        """As :meth:`NativeStepper.sample`; the loop runs here, each pick in the kernel."""
        tokens, states = [], []
        for u in uniforms:
            token = self.kernel.pick(logits.float().contiguous(), u.contiguous(), temperature, top_k, top_p)
            logits, hidden = self.step(token, hidden)
            tokens.append(token)
            states.append((logits, hidden))
        return torch.stack(tokens), states.__getitem__

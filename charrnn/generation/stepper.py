"""One character at a time: the recurrence as a step over pre-packed weights.

Calling ``nn.LSTM`` once per character re-prepares its weights on every call; here the
weights are laid out once, in the orientation the matrix products want, and a step
is a handful of fused ops:

- layer 0's input projection is folded into a table, ``embedding @ W_ih0.T + biases``
  (V, G*H), so feeding a character is a row lookup instead of a product;
- every layer then adds ``h @ W_hh.T`` (one addmm) and applies its gates;
- layers above 0 add ``x @ W_ih.T`` first; the head is one more addmm.

G is the number of gates (``charrnn.model.CELL_TABLE``): 4 for LSTM (i, f, g, o), 3 for GRU (r, z, n), 1 for RNN.
The step is functional (it returns new state tensors), so callers may keep earlier
states to rewind to, and threads may share one Stepper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..config import SampleConfig
from ..errors import ConfigError
from ..model import CharRNN, State
from .processors import pick_next

StateAfter = Callable[[int], tuple[torch.Tensor, State]]  # j -> logits and state right after token j


@dataclass(frozen=True)
class Context:
    """Where a text stands for the model: the logits of the next character, (B, V) float32,
    and the :class:`~charrnn.model.State` after the text, for B streams (B = 1 but in
    ``generate_many``). A state given in torch's own form (h, or (h, c)) is taken as a State."""

    logits: torch.Tensor
    hidden: State

    def __post_init__(self) -> None:
        if not isinstance(self.hidden, State):
            object.__setattr__(self, "hidden", State.from_torch(self.hidden))

    def expand(self, streams: int) -> "Context":
        """The same context for ``streams`` streams side by side (views, no copies)."""
        return Context(self.logits.expand(streams, -1), self.hidden.expand(streams))

    def clone(self) -> "Context":
        """A copy that shares no memory (a read's logits can be a view into a whole text's output)."""
        return Context(self.logits.clone(), self.hidden.clone())

    def nbytes(self) -> int:
        """The memory its tensors hold."""
        return self.logits.numel() * self.logits.element_size() + self.hidden.nbytes()


def run_steps(
    step: Callable[[torch.Tensor, State], tuple[torch.Tensor, State]],
    pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
    hidden: State,
    uniforms: torch.Tensor,
    every_state: bool = True,
    finished: Callable[[], bool] = lambda: False,
) -> tuple[torch.Tensor, StateAfter]:
    """K characters for B streams, one Python iteration each: token k = pick(logits, uniforms[k]),
    then a step. Returns the tokens (K, B) and ``state(j)``, the logits and hidden state
    right after token j; without ``every_state`` only the last is kept (j = K - 1). Once
    ``finished()`` (asked after each step), the steps end there: fewer than K tokens.
    """
    tokens, states = [], []
    for u in uniforms:
        token = pick(logits, u)
        logits, hidden = step(token, hidden)
        tokens.append(token)
        if every_state:
            states.append((logits, hidden))
        else:
            states = [(logits, hidden)]
        if finished():
            break
    last = len(tokens) - 1

    def state(j: int) -> tuple[torch.Tensor, State]:
        if not every_state and j != last:
            raise IndexError("only the state after the last token was kept")
        return states[j if every_state else 0]

    return torch.stack(tokens), state


class Weights:
    """A model's weights arranged for a step, as float32 tensors on its device, rows in
    torch's gate-major order (g * H + u); every stepper packs its own layout from these.

    Layer 0's input product is folded into ``table0`` (V, G * H), so feeding a character
    is a row lookup. The input-side bias ``b_x`` holds b_hh too, except for GRU, whose n
    gate needs ``b_h`` apart: n = tanh(x_n + r * (W_hn h + b_hn)). ``w_x[0]`` and
    ``b_x[0]`` are empty (the table replaces them), as is ``b_h`` but for GRU.
    """

    def __init__(self, model: CharRNN):
        cfg = model.config
        rnn, empty, gru = model.rnn, torch.empty(0), cfg.cell == "gru"

        def p(name: str, layer: int) -> torch.Tensor:
            return getattr(rnn, f"{name}_l{layer}").detach().float().contiguous()

        layers = range(cfg.n_layers)
        x_bias = [p("bias_ih", l) + (0 if gru else p("bias_hh", l)) for l in layers]
        self.table0 = (model.embedding.weight.detach().float() @ p("weight_ih", 0).T + x_bias[0]).contiguous()
        self.w_x = [empty] + [p("weight_ih", l) for l in layers[1:]]
        self.b_x = [empty] + x_bias[1:]
        self.w_h = [p("weight_hh", l) for l in layers]
        self.b_h = [p("bias_hh", l) if gru else empty for l in layers]
        self.w_o = model.head.weight.detach().float().contiguous()
        self.b_o = model.head.bias.detach().float().contiguous()


class Stepper:
    """Advance B streams by one character each, over weights packed from ``model``.

    ``dtype`` is the precision of the matrix products (bfloat16 halves the bytes each
    step reads and runs on AMX / tensor cores); the state and the gate arithmetic stay
    float32, so long generations do not drift.
    """

    def __init__(self, model: CharRNN, dtype: torch.dtype = torch.float32):
        cfg = model.config
        self.cell, self.n_layers = cfg.cell, cfg.n_layers
        self.dtype = dtype
        with torch.no_grad():
            w = Weights(model)

            def matrix(m: torch.Tensor) -> torch.Tensor:  # (out, in) -> (in, out), ready for x @ W
                return m.T.contiguous().to(dtype)

            self.table0 = w.table0
            self.w_hh = [matrix(m) for m in w.w_h]
            self.b_hh = w.b_h  # GRU only: the other cells' b_hh is in b_x
            self.w_ih = [None] + [matrix(m) for m in w.w_x[1:]]
            self.b_x = [None] + w.b_x[1:]
            self.w_head = matrix(w.w_o)
            self.b_head = w.b_o

    def _mm(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """bias + x @ w in float32, the product itself in ``self.dtype``."""
        if self.dtype == torch.float32:
            return torch.addmm(bias, x, w)
        return torch.mm(x.to(self.dtype), w).float() + bias

    def step(self, tokens: torch.Tensor, hidden: State) -> tuple[torch.Tensor, State]:
        """tokens (B,) int64 and the state before them -> float32 logits (B, V) and the new state."""
        h_all, c_all = State.from_torch(hidden)  # unpacking a bare (L, B, H) tensor would split its layers
        new_h, new_c = [], []
        x = None
        for layer in range(self.n_layers):
            h = h_all[layer].float()
            gx = self.table0[tokens] if layer == 0 else self._mm(x, self.w_ih[layer], self.b_x[layer])
            if self.cell == "gru":
                gh = self._mm(h, self.w_hh[layer], self.b_hh[layer])
                xr, xz, xn = gx.chunk(3, 1)
                hr, hz, hn = gh.chunk(3, 1)
                r = torch.sigmoid(xr + hr)
                z = torch.sigmoid(xz + hz)
                n = torch.tanh(xn + r * hn)
                x = n + z * (h - n)  # (1 - z) * n + z * h
            else:
                gates = self._mm(h, self.w_hh[layer], gx)
                if self.cell == "lstm":
                    i, f, g, o = gates.chunk(4, 1)
                    c = torch.sigmoid(f) * c_all[layer].float() + torch.sigmoid(i) * torch.tanh(g)
                    x = torch.sigmoid(o) * torch.tanh(c)
                    new_c.append(c)
                else:
                    x = torch.tanh(gates) if self.cell == "rnn_tanh" else torch.relu(gates)
            new_h.append(x)
        logits = self._mm(x, self.w_head, self.b_head)
        return logits, State.stack(new_h, new_c)

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
        """K characters per stream, as the kernel steppers' ``sample``: each picked by
        :func:`~charrnn.generation.processors.pick_next` with its uniform, then a step."""
        config = SampleConfig(temperature=temperature, top_k=top_k, top_p=top_p)

        def pick(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            return pick_next(logits, config, u)

        return run_steps(self.step, pick, logits, hidden, uniforms, every_state)


# --- which stepper ----------------------------------------------------------------------------

BATCH_STREAMS = 8  # from this many streams on, products run as batched matrix products


class StepperChoice(NamedTuple):
    """How a sampling step runs: ``kind`` is one of

    - ``fused``: the kernel's whole loop over float32 or int8 rows (one or a few streams);
    - ``tiles``: the kernel's loop over AMX bfloat16 tiles (batches, where the CPU has AMX);
    - ``batched``: oneDNN products with the kernel's cells and picks (batches, no AMX);
    - ``torch``: plain torch ops (GPUs, and CPUs without the kernel).
    """

    kind: str
    dtype: torch.dtype


def choose_stepper(
    device: str, dtype: torch.dtype | None, streams: int, kernel: bool, tiles: bool, fast_bf16: bool
) -> StepperChoice:
    """The stepper for ``streams`` streams on ``device`` (its type: cpu, cuda, mps), from the
    facts of the machine; a pure function, so every rule is testable without the machine.

    ``dtype`` None (auto): on a CPU with the kernel, fewer than 8 streams use int8 rows
    (reading the weights is the bottleneck, and int8 rows stay in cache); 8 or more use
    bfloat16 products where the hardware runs them natively (``fast_bf16``), else float32.
    ``kernel``: charrnn's CPU kernel is loaded; ``tiles``: it has usable AMX tiles.
    """
    batch = streams >= BATCH_STREAMS
    if dtype is None:
        if kernel and not batch:
            dtype = torch.int8
        else:
            dtype = torch.bfloat16 if batch and fast_bf16 else torch.float32
    if dtype == torch.int8 and not kernel:
        where = "on this machine" if device == "cpu" else f"on {device}"
        raise ConfigError(f"int8 sampling runs on charrnn's CPU kernel, which is not available {where}: use float32 or bfloat16")
    if not kernel:
        return StepperChoice("torch", dtype)
    if dtype == torch.int8 or (dtype == torch.float32 and not batch):
        return StepperChoice("fused", dtype)
    if dtype == torch.bfloat16 and tiles:
        return StepperChoice("tiles", dtype)
    return StepperChoice("batched", dtype)

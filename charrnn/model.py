"""CharRNN: embedding -> stacked RNN/LSTM/GRU -> linear head, with the dropouts of AWD-LSTM while training.

Shapes: B = batch, T = time, V = vocabulary, H = hidden size, L = layers.
The recurrent stack is torch's fused ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (cuDNN on
CUDA, oneDNN on CPU), which is the fast path for whole sequences. Sampling one
character at a time uses ``charrnn.generation.stepper`` instead, over the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import CELLS as CELL_NAMES
from .config import ModelConfig

# torch's own form of a state: an LSTM's is (h, c), the other cells' h alone. Only
# CharRNN.forward meets it (State.as_torch / State.from_torch); everything else holds a State.
TorchHidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class State(NamedTuple):
    """The recurrent state of B streams, the same type for every cell.

    ``h`` is (L, B, H); ``c`` is the LSTM's cell state, the same shape, and None for the
    cells that carry h alone. Every operation maps over the tensors present, so code that
    holds a state never asks which cell made it. A NamedTuple, so torch's tree utilities
    (DDP, ``torch.compile``) see through it.
    """

    h: torch.Tensor
    c: torch.Tensor | None = None

    @classmethod
    def zeros(cls, layers: int, batch: int, hidden: int, cell_state: bool, device: torch.device | str | None = None) -> "State":
        """The zero state of ``batch`` streams; with ``cell_state``, c too."""
        h = torch.zeros(layers, batch, hidden, device=device)
        return cls(h, h.clone() if cell_state else None)

    @classmethod
    def from_torch(cls, hidden: "TorchHidden | State") -> "State":
        """A State from what ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` return (a State is taken as it is)."""
        return cls(hidden) if isinstance(hidden, torch.Tensor) else cls(*hidden)

    def as_torch(self) -> TorchHidden:
        """The form torch's recurrent modules take: (h, c), or h alone."""
        return self.h if self.c is None else (self.h, self.c)

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor]) -> "State":
        """The inverse of :meth:`tensors`: (h,) or (h, c)."""
        if len(tensors) not in (1, 2):
            raise ValueError(f"a state has 1 or 2 tensors (h, and c for an LSTM), got {len(tensors)}")
        return cls(*tensors)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors present, (h,) or (h, c): what a file holds, in this order."""
        return (self.h,) if self.c is None else (self.h, self.c)

    def named(self) -> dict[str, torch.Tensor]:
        """The tensors present by name, {"h": ...} or {"h": ..., "c": ...}."""
        return dict(zip(self._fields, self.tensors()))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "State":
        """``fn`` applied to every tensor present."""
        return State(fn(self.h), None if self.c is None else fn(self.c))

    @property
    def has_cell_state(self) -> bool:
        return self.c is not None

    @property
    def streams(self) -> int:
        """B, the number of streams side by side."""
        return self.h.size(1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def detach(self) -> "State":
        """Cut the graph between truncated-BPTT chunks while keeping the values."""
        return self.map(torch.Tensor.detach)

    def clone(self) -> "State":
        return self.map(torch.Tensor.clone)

    def to(self, *args: Any, **kwargs: Any) -> "State":
        """As ``Tensor.to`` (a device, a dtype), for every tensor."""
        return self.map(lambda t: t.to(*args, **kwargs))

    def select(self, rows: torch.Tensor | slice | Sequence[int]) -> "State":
        """The state of some of the streams (``rows`` index B)."""
        return self.map(lambda t: t[:, rows])

    def expand(self, streams: int) -> "State":
        """One stream's state for ``streams`` streams side by side (views, no copies)."""
        return self.map(lambda t: t.expand(-1, streams, -1))

    def kernel_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """h and c as charrnn's compiled kernel takes them: contiguous float32, c empty when absent."""
        h = self.h.float().contiguous()
        return h, (torch.empty(0) if self.c is None else self.c.float().contiguous())

    @classmethod
    def from_kernel(cls, h: torch.Tensor, c: torch.Tensor) -> "State":
        """The inverse of :meth:`kernel_form`: an empty c is no cell state."""
        return cls(h, c if c.numel() else None)

    @classmethod
    def stack(cls, h: Sequence[torch.Tensor], c: Sequence[torch.Tensor]) -> "State":
        """A state from per-layer tensors (B, H); an empty ``c`` is no cell state."""
        return cls(torch.stack(list(h)), torch.stack(list(c)) if len(c) else None)


@dataclass(frozen=True)
class Cell:
    """What charrnn needs to know of a recurrent cell, in one place.

    The compiled kernel (``csrc/step.cpp``) takes ``gates`` and ``has_cell_state`` from
    here and checks them against the arithmetic it runs for ``kernel_id``: a new cell is
    one row here plus its arithmetic in the stepper and the kernel's ``cell_update``.
    """

    module: type[nn.RNNBase]  # torch's fused stack of this cell
    gates: int  # gate blocks per unit in torch's weight rows (G)
    kernel_id: int  # which arithmetic of csrc/step.cpp's ``cell_update`` computes it
    has_cell_state: bool  # carries c beside h (LSTM)
    title: str  # its name for readers, as a model card writes it
    options: dict[str, Any] = field(default_factory=dict)  # extra arguments of ``module``

    @property
    def state_names(self) -> tuple[str, ...]:
        """The names of its state's tensors, as :meth:`State.named` gives them: ("h", "c") or ("h",)."""
        return State._fields if self.has_cell_state else State._fields[:1]


CELL_TABLE: dict[str, Cell] = {
    "lstm": Cell(nn.LSTM, gates=4, kernel_id=0, has_cell_state=True, title="LSTM"),  # gates i, f, g, o
    "gru": Cell(nn.GRU, gates=3, kernel_id=1, has_cell_state=False, title="GRU"),  # gates r, z, n
    "rnn_tanh": Cell(
        nn.RNN, gates=1, kernel_id=2, has_cell_state=False, title="Elman RNN (tanh)", options={"nonlinearity": "tanh"}
    ),
    "rnn_relu": Cell(
        nn.RNN, gates=1, kernel_id=3, has_cell_state=False, title="Elman RNN (ReLU)", options={"nonlinearity": "relu"}
    ),
}
assert tuple(CELL_TABLE) == CELL_NAMES, "config.CELLS and the cell table name the same cells"


class CharRNN(nn.Module):
    """A many-to-many character-level recurrent language model."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set before building a model")
        if config.unresolved:
            raise ValueError(
                f"ModelConfig {', '.join(config.unresolved)} are auto (None): give them, or let "
                "charrnn.training.sizing.plan_run choose them from a budget, before building a model"
            )
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        cell = CELL_TABLE[config.cell]
        self.rnn = cell.module(
            config.embedding_size,
            config.hidden_size,
            num_layers=config.n_layers,
            # torch applies this dropout between layers only; the input and head dropout are ours.
            dropout=config.dropout if config.n_layers > 1 else 0.0,
            batch_first=True,
            **cell.options,
        )
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self._recurrent_weights = [f"weight_hh_l{layer}" for layer in range(config.n_layers)]

    def init_hidden(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """The zero state for ``batch_size`` streams (h, and c for an LSTM: each (L, B, H))."""
        device = device if device is not None else self.head.weight.device
        cfg = self.config
        return State.zeros(cfg.n_layers, batch_size, cfg.hidden_size, CELL_TABLE[cfg.cell].has_cell_state, device)

    def forward(self, idx: torch.Tensor, hidden: State | None = None) -> tuple[torch.Tensor, State]:
        """idx (B, T) int64 -> logits (B, T, V) and the :class:`State` after the last step (None: zeros)."""
        cfg, training = self.config, self.training
        weight = self.embedding.weight
        if training and cfg.embedding_dropout:  # a dropped character reads as zeros wherever it occurs
            keep = weight.new_empty(weight.size(0), 1).bernoulli_(1 - cfg.embedding_dropout)
            weight = weight * keep / (1 - cfg.embedding_dropout)
        x = locked_dropout(F.embedding(idx, weight), cfg.input_dropout, training)  # (B, T, E)
        # The one place torch's own form of the state is met: (h, c) for nn.LSTM, h otherwise.
        start = None if hidden is None else State.from_torch(hidden).as_torch()
        if training and cfg.weight_drop:
            # DropConnect on the recurrent matrices (AWD-LSTM): one mask for every step of this batch,
            # so the fused kernel still runs the whole sequence.
            dropped = {name: F.dropout(getattr(self.rnn, name), cfg.weight_drop) for name in self._recurrent_weights}
            out, hidden = torch.func.functional_call(self.rnn, dropped, (x, start), strict=False)
        else:
            out, hidden = self.rnn(x, start)  # (B, T, H)
        return self.head(locked_dropout(out, cfg.dropout, training)), State.from_torch(hidden)


def locked_dropout(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Variational dropout of x (B, T, F): one mask per stream and feature, the same at every step.

    A mask that changes every step disturbs what the recurrence carries from step to step;
    one held through the sequence regularises without that noise (Gal & Ghahramani; AWD-LSTM).
    """
    if not training or not rate:
        return x
    mask = x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - rate)
    return x * mask / (1 - rate)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def load_grown(model: CharRNN, source: CharRNN) -> None:
    """Copy ``source``'s weights into ``model``, whose vocabulary extends ``source``'s (fine-tuning).

    Ids below ``source``'s vocabulary size keep their rows. A new character keeps the
    embedding row ``model`` was initialised with (a fresh random vector, as any character
    starts), and its output row starts as a copy of ``<unk>``'s (id 0): the model's learnt
    logit for "a character it never saw", so a new character starts as unlikely as that
    and the known characters' probabilities are barely disturbed on the first step.
    """
    old, new = source.config.vocab_size, model.config.vocab_size
    if new < old:
        raise ValueError(f"the vocabulary can only grow: {old} -> {new}")
    weights = source.state_dict()
    target = model.state_dict()
    for name, value in weights.items():
        if name == "embedding.weight":
            target[name][:old] = value
        elif name in ("head.weight", "head.bias"):
            target[name][:old] = value
            target[name][old:] = value[0]
        else:
            target[name].copy_(value)

"""CharRNN: embedding -> stacked RNN/LSTM/GRU -> dropout -> linear head.

Shapes: B = batch, T = time, V = vocabulary, H = hidden size, L = layers.
The recurrent stack is torch's fused ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (cuDNN on
CUDA, oneDNN on CPU), which is the fast path for whole sequences. Sampling one
character at a time uses ``charrnn.stepper`` instead, over the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import CELLS as CELL_NAMES
from .config import ModelConfig

# An LSTM's state is (h, c); the other cells carry h alone.
Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Cell:
    """What charrnn needs to know of a recurrent cell, in one place."""

    module: type[nn.RNNBase]  # torch's fused stack of this cell
    gates: int  # gate blocks per unit in torch's weight rows (G)
    kernel_id: int  # its number in csrc/step.cpp's ``enum Cell``
    has_cell_state: bool  # carries c beside h (LSTM)
    options: dict[str, Any] = field(default_factory=dict)  # extra arguments of ``module``


CELL_TABLE: dict[str, Cell] = {
    "lstm": Cell(nn.LSTM, gates=4, kernel_id=0, has_cell_state=True),  # gates i, f, g, o
    "gru": Cell(nn.GRU, gates=3, kernel_id=1, has_cell_state=False),  # gates r, z, n
    "rnn_tanh": Cell(nn.RNN, gates=1, kernel_id=2, has_cell_state=False, options={"nonlinearity": "tanh"}),
    "rnn_relu": Cell(nn.RNN, gates=1, kernel_id=3, has_cell_state=False, options={"nonlinearity": "relu"}),
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
            # torch applies this dropout between layers only; the head dropout is ours.
            dropout=config.dropout if config.n_layers > 1 else 0.0,
            batch_first=True,
            **cell.options,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def init_hidden(self, batch_size: int, device: torch.device | str | None = None) -> Hidden:
        """Zero state for ``batch_size`` streams: (L, B, H), or a pair of them for LSTM."""
        device = device if device is not None else self.head.weight.device
        zeros = torch.zeros(self.config.n_layers, batch_size, self.config.hidden_size, device=device)
        return (zeros, zeros.clone()) if CELL_TABLE[self.config.cell].has_cell_state else zeros

    def forward(self, idx: torch.Tensor, hidden: Hidden | None = None) -> tuple[torch.Tensor, Hidden]:
        """idx (B, T) int64 -> logits (B, T, V) and the state after the last step."""
        x = self.embedding(idx)  # (B, T, E)
        out, hidden = self.rnn(x, hidden)  # (B, T, H)
        return self.head(self.dropout(out)), hidden


def detach_hidden(hidden: Hidden) -> Hidden:
    """Cut the graph between truncated-BPTT chunks while keeping the values."""
    if isinstance(hidden, tuple):
        return tuple(h.detach() for h in hidden)  # type: ignore[return-value]
    return hidden.detach()


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

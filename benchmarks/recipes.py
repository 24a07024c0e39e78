"""Recipe variants tried in the scaling study (``budget.py run --variant NAME``).

Each variant changes a freshly built :class:`~charrnn.training.trainer.Trainer` before it
trains, so that an idea can be measured against the defaults at the same budget before it
earns a place in the package. They are study code: a variant's ``last`` checkpoint is not
meant to be resumed, and ``best`` holds the weights the variant evaluates.

- ``ema``: evaluate (and save as ``best``) an exponential moving average of the weights,
  decay ``min(0.998, (1 + step) / (10 + step))``, as Polyak averaging does;
- ``weight-drop``: DropConnect on the hidden-to-hidden matrices (AWD-LSTM's dropout on the
  recurrent state), a fresh mask per batch, rate 0.2; the fused ``nn.LSTM`` still runs;
- ``layer-norm``: an LSTM with layer normalisation of the gate pre-activations and of the
  cell (Ba et al. 2016), run step by step in Python since torch has no fused form of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from charrnn.training.schedule import make_optimizer
from charrnn.training.trainer import Trainer


def ema(trainer: Trainer, cap: float = 0.998) -> None:
    averaged = [p.detach().clone() for p in trainer.model.parameters()]
    step_once, checkpoint_once = trainer.train_step, trainer.checkpoint

    def train_step() -> float:
        loss = step_once()
        decay = min(cap, (1 + trainer.step) / (10 + trainer.step))
        torch._foreach_lerp_(averaged, [p.detach() for p in trainer.model.parameters()], 1 - decay)
        return loss

    def checkpoint() -> None:
        live = [p.detach().clone() for p in trainer.model.parameters()]
        with torch.no_grad():
            torch._foreach_copy_(list(trainer.model.parameters()), averaged)
        try:
            checkpoint_once()
        finally:
            with torch.no_grad():
                torch._foreach_copy_(list(trainer.model.parameters()), live)

    trainer.train_step, trainer.checkpoint = train_step, checkpoint  # type: ignore[method-assign]


class WeightDrop(nn.Module):
    """Runs a fused torch RNN with its hidden-to-hidden matrices under dropout while training."""

    def __init__(self, rnn: nn.RNNBase, rate: float) -> None:
        super().__init__()
        self.rnn, self.rate = rnn, rate
        self.names = [f"weight_hh_l{layer}" for layer in range(rnn.num_layers)]

    def forward(self, x: torch.Tensor, state=None):
        if not self.training:
            return self.rnn(x, state)
        weights = {name: F.dropout(getattr(self.rnn, name), self.rate) for name in self.names}
        return torch.func.functional_call(self.rnn, weights, (x, state), strict=False)


def weight_drop(trainer: Trainer, rate: float = 0.2) -> None:
    trainer.model.rnn = WeightDrop(trainer.model.rnn, rate)


class LayerNormLSTM(nn.Module):
    """A stacked LSTM with layer-normalised gates and cell, batch first, torch's (h, c) layout."""

    def __init__(self, inputs: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.hidden_size, self.num_layers, self.dropout = hidden, layers, dropout
        self.input_maps = nn.ModuleList(nn.Linear(inputs if i == 0 else hidden, 4 * hidden) for i in range(layers))
        self.state_maps = nn.ModuleList(nn.Linear(hidden, 4 * hidden, bias=False) for _ in range(layers))
        self.norm_x = nn.ModuleList(nn.LayerNorm(4 * hidden) for _ in range(layers))
        self.norm_h = nn.ModuleList(nn.LayerNorm(4 * hidden) for _ in range(layers))
        self.norm_c = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor, state=None):
        B = x.size(0)
        if state is None:
            zeros = x.new_zeros(self.num_layers, B, self.hidden_size, dtype=torch.float32)
            state = (zeros, zeros)
        hs, cs = list(state[0].unbind(0)), list(state[1].unbind(0))
        for layer in range(self.num_layers):
            if layer and self.dropout and self.training:
                x = F.dropout(x, self.dropout)
            gx = self.norm_x[layer](self.input_maps[layer](x))  # all steps' input parts at once
            h, c, out = hs[layer], cs[layer], []
            for t in range(x.size(1)):
                gates = gx[:, t] + self.norm_h[layer](self.state_maps[layer](h))
                i, f, g, o = gates.float().chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(self.norm_c[layer](c))
                out.append(h)
            hs[layer], cs[layer] = h, c
            x = torch.stack(out, dim=1)
        return x, (torch.stack(hs), torch.stack(cs))


def layer_norm(trainer: Trainer) -> None:
    m = trainer.model_config
    trainer.model.rnn = LayerNormLSTM(m.embedding_size, m.hidden_size, m.n_layers, m.dropout).to(trainer.device)
    trainer.train_model = trainer.model
    trainer.optimizer = make_optimizer(trainer.model, trainer.config)


VARIANTS: dict[str, Callable[[Trainer], None]] = {"ema": ema, "weight-drop": weight_drop, "layer-norm": layer_norm}

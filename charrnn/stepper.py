"""One character at a time: the recurrence as a step over pre-packed weights.

Calling ``nn.LSTM`` once per character re-prepares its weights on every call; here the
weights are laid out once, in the orientation the matrix products want, and a step
is a handful of fused ops:

- layer 0's input projection is folded into a table, ``embedding @ W_ih0.T + biases``
  (V, G*H), so feeding a character is a row lookup instead of a product;
- every layer then adds ``h @ W_hh.T`` (one addmm) and applies its gates;
- layers above 0 add ``x @ W_ih.T`` first; the head is one more addmm.

G is the number of gates: 4 for LSTM (i, f, g, o), 3 for GRU (r, z, n), 1 for RNN.
The step is functional (it returns new state tensors), so callers may keep earlier
states to rewind to, and threads may share one Stepper.
"""

from __future__ import annotations

import torch

from .model import CharRNN, Hidden

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


class Stepper:
    """Advance B streams by one character each, over weights packed from ``model``."""

    def __init__(self, model: CharRNN, dtype: torch.dtype = torch.float32):
        cfg = model.config
        self.cell, self.n_layers, self.hidden_size = cfg.cell, cfg.n_layers, cfg.hidden_size
        self.dtype = dtype
        rnn = model.rnn
        with torch.no_grad():

            def p(name: str, layer: int) -> torch.Tensor:
                return getattr(rnn, f"{name}_l{layer}").detach().float()

            # For GRU, b_hh stays with the hidden product: n = tanh(x_n + r * (W_hn h + b_hn)).
            hidden_bias_in_x = cfg.cell != "gru"
            bias0 = p("bias_ih", 0) + (p("bias_hh", 0) if hidden_bias_in_x else 0)
            self.table0 = (model.embedding.weight.detach().float() @ p("weight_ih", 0).T + bias0).to(dtype)
            self.w_hh = [p("weight_hh", l).T.contiguous().to(dtype) for l in range(cfg.n_layers)]
            self.b_hh = [p("bias_hh", l).to(dtype) for l in range(cfg.n_layers)]
            self.w_ih = [None] + [p("weight_ih", l).T.contiguous().to(dtype) for l in range(1, cfg.n_layers)]
            self.b_x = [None] + [
                (p("bias_ih", l) + (p("bias_hh", l) if hidden_bias_in_x else 0)).to(dtype)
                for l in range(1, cfg.n_layers)
            ]
            self.w_head = model.head.weight.detach().float().T.contiguous().to(dtype)
            self.b_head = model.head.bias.detach().float().to(dtype)

    def step(self, tokens: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        """tokens (B,) int64, hidden as from ``CharRNN`` -> float32 logits (B, V) and the new hidden."""
        lstm = self.cell == "lstm"
        h_all, c_all = hidden if lstm else (hidden, None)
        new_h, new_c = [], []
        x = None
        for layer in range(self.n_layers):
            h = h_all[layer].to(self.dtype)
            gx = self.table0[tokens] if layer == 0 else torch.addmm(self.b_x[layer], x, self.w_ih[layer])
            if self.cell == "gru":
                gh = torch.addmm(self.b_hh[layer], h, self.w_hh[layer])
                xr, xz, xn = gx.chunk(3, 1)
                hr, hz, hn = gh.chunk(3, 1)
                r = torch.sigmoid(xr + hr)
                z = torch.sigmoid(xz + hz)
                n = torch.tanh(xn + r * hn)
                x = n + z * (h - n)  # (1 - z) * n + z * h
            else:
                gates = torch.addmm(gx, h, self.w_hh[layer])
                if lstm:
                    i, f, g, o = gates.chunk(4, 1)
                    c = torch.sigmoid(f) * c_all[layer].to(self.dtype) + torch.sigmoid(i) * torch.tanh(g)
                    x = torch.sigmoid(o) * torch.tanh(c)
                    new_c.append(c)
                else:
                    x = torch.tanh(gates) if self.cell == "rnn_tanh" else torch.relu(gates)
            new_h.append(x)
        logits = torch.addmm(self.b_head, x, self.w_head).float()
        h_out = torch.stack(new_h)
        return logits, ((h_out, torch.stack(new_c)) if lstm else h_out)

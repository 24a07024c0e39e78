"""CharRNN shapes, ModelConfig validation, and the one-step Stepper against the full forward."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from charrnn import CharRNN, ConfigError, Context, ModelConfig, State
from charrnn.config import CELLS
from charrnn.generation.stepper import Stepper
from charrnn.model import CELL_TABLE, locked_dropout

V, B, T, H, L = 13, 3, 11, 16, 2


def _model(cell: str, n_layers: int = L, dropout: float = 0.0, seed: int = 0) -> CharRNN:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=V, cell=cell, n_layers=n_layers, hidden_size=H, embedding_size=8, dropout=dropout)
    return CharRNN(config).eval()


def _idx(seed: int = 1, batch: int = B, time: int = T) -> torch.Tensor:
    return torch.randint(V, (batch, time), generator=torch.Generator().manual_seed(seed))


def _assert_hidden_shape(cell, hidden, n_layers, batch):
    assert isinstance(hidden, State)
    if cell == "lstm":  # (h, c)
        assert hidden.c is not None and len(hidden.tensors()) == 2
        for h in hidden.tensors():
            assert h.shape == (n_layers, batch, H)
    else:  # h alone
        assert hidden.c is None and len(hidden.tensors()) == 1
        assert hidden.h.shape == (n_layers, batch, H)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("n_layers", [1, 2])
def test_forward_shapes(cell, n_layers):
    model = _model(cell, n_layers)
    logits, hidden = model(_idx())
    assert logits.shape == (B, T, V)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    _assert_hidden_shape(cell, hidden, n_layers, B)
    _assert_hidden_shape(cell, model.init_hidden(5), n_layers, 5)


@pytest.mark.parametrize("cell", CELLS)
def test_hidden_state_carries_across_calls(cell):
    """Reading a sequence in two chunks, passing the state on, equals reading it at once."""
    model = _model(cell)
    idx = _idx()
    full, hidden_full = model(idx)
    first, hidden = model(idx[:, :4])
    second, hidden = model(idx[:, 4:], hidden)
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=0)
    assert len(hidden.tensors()) == len(hidden_full.tensors())
    for a, b in zip(hidden.tensors(), hidden_full.tensors()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_zero_init_hidden_equals_no_hidden(cell):
    model = _model(cell)
    idx = _idx()
    torch.testing.assert_close(model(idx, model.init_hidden(B))[0], model(idx)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_stepper_matches_full_forward(cell):
    # dropout > 0: the model is in eval mode, where both paths must ignore it
    model = _model(cell, n_layers=2, dropout=0.3)
    idx = _idx(seed=2, time=25)
    with torch.no_grad():
        full, hidden_full = model(idx)
        stepper = Stepper(model)
        hidden = model.init_hidden(B)
        for t in range(idx.size(1)):
            logits, hidden = stepper.step(idx[:, t], hidden)
            assert logits.shape == (B, V)
            torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=0)
    _assert_hidden_shape(cell, hidden, 2, B)
    for a, b in zip(hidden.tensors(), hidden_full.tensors(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_state_is_one_type_for_every_cell(cell):
    """torch's form (h, or (h, c) for nn.LSTM) goes in and out at the model's edge only; a State maps over what it holds."""
    model = _model(cell)
    idx = _idx()
    full, state = model(idx)
    torch_form = state.as_torch()
    if cell == "lstm":
        assert isinstance(torch_form, tuple) and len(torch_form) == 2
    else:
        assert isinstance(torch_form, torch.Tensor)
    again = State.from_torch(torch_form)
    assert all(torch.equal(a, b) for a, b in zip(again.tensors(), state.tensors(), strict=True))
    same = State.from_torch(state)  # a State is taken as it is
    assert same.h is state.h and same.c is state.c
    # The torch form still works where a state goes in: the model and a Context take it.
    first, half = model(idx[:, :4])
    second, _ = model(idx[:, 4:], half.as_torch())
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=0)
    assert isinstance(Context(full[:, -1], torch_form).hidden, State)
    assert tuple(state.named()) == CELL_TABLE[cell].state_names
    assert State.from_tensors(state.tensors()).has_cell_state == CELL_TABLE[cell].has_cell_state
    # The operations map over h (and c): detach, clone, select, expand, to.
    grad = model(idx)[1]
    assert grad.h.requires_grad and not grad.detach().h.requires_grad
    picked = state.select([0, 2])
    assert picked.streams == 2 and torch.equal(picked.h, state.h[:, [0, 2]])
    one = state.select(slice(1, 2))
    wide = one.expand(5)
    assert wide.streams == 5 and all(torch.equal(w[:, 4], o[:, 0]) for w, o in zip(wide.tensors(), one.tensors()))
    copy = state.clone()
    assert copy.h.data_ptr() != state.h.data_ptr() and torch.equal(copy.h, state.h)
    assert state.to(torch.float64).h.dtype == torch.float64
    assert state.nbytes() == sum(t.numel() * 4 for t in state.tensors())
    with pytest.raises(ValueError, match="a state has 1 or 2 tensors"):
        State.from_tensors([])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cell": "transformer"}, r"unknown cell 'transformer': choose one of lstm, gru, rnn_tanh, rnn_relu"),
        ({"n_layers": 0}, r"n_layers must be at least 1, got 0"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\), got 1.5"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\), got -0.1"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": float("nan")}, r"dropout must be in \[0, 1\), got nan"),
        ({"hidden_size": 0}, r"hidden_size must be at least 1, got 0"),
        ({"embedding_size": -3}, r"embedding_size must be at least 1, got -3"),
    ],
)
def test_model_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(vocab_size=V, **overrides)


def test_model_config_dict_round_trip_and_unknown_keys():
    config = ModelConfig(vocab_size=V, cell="gru", n_layers=3, hidden_size=7, embedding_size=5, dropout=0.25)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"unknown model settings \['heads'\]"):
        ModelConfig.from_dict({**config.to_dict(), "heads": 4})


def test_awd_regularisation_acts_in_training_only_and_holds_its_mask_through_a_sequence():
    plain = _model("lstm", n_layers=2)
    config = replace(plain.config, dropout=0.5, input_dropout=0.3, embedding_dropout=0.2, weight_drop=0.5)
    regularised = CharRNN(config)
    regularised.load_state_dict(plain.state_dict())
    idx = torch.randint(V, (3, 12), generator=torch.Generator().manual_seed(0))
    plain.eval(), regularised.eval()
    assert torch.equal(plain(idx)[0], regularised(idx)[0])  # sampling and evaluation never see it
    regularised.train()
    torch.manual_seed(1)
    first = regularised(idx)[0]
    assert not torch.allclose(first, plain(idx)[0])
    first.sum().backward()  # weight drop keeps the gradient path to the recurrent weights
    assert regularised.rnn.weight_hh_l0.grad is not None and regularised.rnn.weight_hh_l0.grad.abs().sum() > 0
    # Locked dropout: a feature dropped for a stream is dropped at every step of it.
    x = torch.ones(4, 50, 6)
    out = locked_dropout(x, 0.5, training=True)
    assert torch.equal(out, out[:, :1].expand_as(out)) and (out == 0).any()

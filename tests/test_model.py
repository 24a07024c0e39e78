"""CharRNN shapes, ModelConfig validation, and the one-step Stepper against the full forward."""

from __future__ import annotations

import pytest
import torch

from charrnn import CharRNN, ConfigError, ModelConfig
from charrnn.config import CELLS
from charrnn.generation.stepper import Stepper

V, B, T, H, L = 13, 3, 11, 16, 2


def _model(cell: str, n_layers: int = L, dropout: float = 0.0, seed: int = 0) -> CharRNN:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=V, cell=cell, n_layers=n_layers, hidden_size=H, embedding_size=8, dropout=dropout)
    return CharRNN(config).eval()


def _idx(seed: int = 1, batch: int = B, time: int = T) -> torch.Tensor:
    return torch.randint(V, (batch, time), generator=torch.Generator().manual_seed(seed))


def _assert_hidden_shape(cell, hidden, n_layers, batch):
    if cell == "lstm":
        assert isinstance(hidden, tuple) and len(hidden) == 2
        for h in hidden:
            assert h.shape == (n_layers, batch, H)
    else:
        assert isinstance(hidden, torch.Tensor)
        assert hidden.shape == (n_layers, batch, H)


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
    for a, b in zip(hidden if cell == "lstm" else (hidden,), hidden_full if cell == "lstm" else (hidden_full,)):
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
    pairs = zip(hidden, hidden_full) if cell == "lstm" else [(hidden, hidden_full)]
    for a, b in pairs:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cell": "transformer"}, r"unknown cell 'transformer': choose one of lstm, gru, rnn_tanh, rnn_relu"),
        ({"n_layers": 0}, r"--n-layers must be at least 1, got 0"),
        ({"dropout": 1.5}, r"--dropout must be in \[0, 1\), got 1.5"),
        ({"dropout": -0.1}, r"--dropout must be in \[0, 1\), got -0.1"),
        ({"dropout": 1.0}, r"--dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": float("nan")}, r"--dropout must be in \[0, 1\), got nan"),
        ({"hidden_size": 0}, r"--hidden-size must be at least 1, got 0"),
        ({"embedding_size": -3}, r"--embedding-size must be at least 1, got -3"),
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

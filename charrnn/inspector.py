"""A look inside the hidden state: colour each character by what chosen units hold.

After Karpathy's "The Unreasonable Effectiveness of Recurrent Neural Networks": run a
text through a trained model, record every layer's state after each character, and
write a self-contained HTML page (inline CSS, no script, no external resource) with
the text coloured once per unit, blue for negative, white for zero, red for positive.

Which state:
    ``--state c`` (the LSTM default) is the cell state, the long memory where units that
    count line length or sit "inside a quote" live; it is unbounded, so the colour is
    ``tanh(c)``, what the output gate reads. ``--state h`` is the hidden output, in
    [-1, 1] for LSTM, GRU and tanh RNN (a ReLU RNN's h is scaled by its largest value
    in the text). GRU and RNN cells only have h.

Which units:
    ``--units 3 41`` shows those units of ``--layer`` (default the last layer).
    ``--pattern REGEX`` ranks the units by the Pearson correlation between a unit's
    state after each character and a 0/1 indicator "this character is inside a match
    of REGEX", and shows the ``--top`` units of largest |r| (a unit that is low inside
    the matches follows the pattern as well as one that is high); ``--layer all``
    ranks every layer's units. With neither, the ``--top`` units whose state varies
    most over the text are shown.

How the states are computed:
    ``nn.LSTM`` returns only the last layer's h at every step, so the stack is run one
    layer at a time (the fused kernel, one layer's weights each); an LSTM's cell states
    are then rebuilt from the gates, which depend only on the layer's input and its
    previous h: ``c_t = f_t * c_(t-1) + i_t * g_t``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, PromptError
from .model import CELL_TABLE, CharRNN
from .tokenizer import CharTokenizer

MAX_TEXT_CHARS = 10_000  # the page holds one coloured copy of the text per unit
MAX_UNITS = 32
DEFAULT_TOP = 5

# Colour scale ends (RdBu-like); light enough that black text stays readable on them.
_NEGATIVE = (67, 147, 195)
_POSITIVE = (214, 96, 77)


# --- states ------------------------------------------------------------------------------


@dataclass
class LayerStates:
    """One layer's state after each character: h (T, H), and c (T, H) for an LSTM."""

    h: np.ndarray
    c: np.ndarray | None = None


def _single_layer(rnn: nn.RNNBase, layer: int, input_size: int) -> nn.RNNBase:
    """A one-layer copy of ``rnn``'s layer ``layer`` (same cell, same weights)."""
    extra = {"nonlinearity": rnn.nonlinearity} if isinstance(rnn, nn.RNN) else {}
    single = type(rnn)(input_size, rnn.hidden_size, num_layers=1, batch_first=True, **extra)
    single.to(rnn.weight_hh_l0.device)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(single, f"{name}_l0").copy_(getattr(rnn, f"{name}_l{layer}").float())
    return single.eval()


@torch.no_grad()
def hidden_states(model: CharRNN, ids: torch.Tensor) -> list[LayerStates]:
    """Every layer's state after each of the token ids (T,), from the zero state (no dropout)."""
    rnn = model.rnn
    has_c = CELL_TABLE[model.config.cell].has_cell_state
    x = model.embedding(ids.to(model.head.weight.device)[None]).float()  # (1, T, E)
    layers = []
    for layer in range(model.config.n_layers):
        single = _single_layer(rnn, layer, x.size(-1))
        h, _ = single(x)  # (1, T, H): h after each character
        c = None
        if has_c:  # only an LSTM carries c; its gates give it
            # The gates at step t need the layer's input x_t and the previous h.
            h_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
            gates = x @ single.weight_ih_l0.T + single.bias_ih_l0 + h_prev @ single.weight_hh_l0.T + single.bias_hh_l0
            i, f, g, _o = gates[0].chunk(4, dim=-1)  # torch's gate order: i, f, g, o
            f, ig = torch.sigmoid(f), torch.sigmoid(i) * torch.tanh(g)
            c = torch.empty_like(ig)
            state = torch.zeros_like(ig[0])
            for t in range(ig.size(0)):
                state = f[t] * state + ig[t]
                c[t] = state
            c = c.cpu().numpy()
        layers.append(LayerStates(h[0].cpu().numpy(), c))
        x = h  # eval mode: no dropout between layers
    return layers


# --- ranking -------------------------------------------------------------------------------


def compile_pattern(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--pattern {pattern!r} is not a valid regular expression ({exc})") from None


def pattern_indicator(text: str, pattern: str | re.Pattern) -> np.ndarray:
    """A 0/1 float array (len(text),): 1 where the character is inside a match of ``pattern``."""
    regex = compile_pattern(pattern) if isinstance(pattern, str) else pattern
    inside = np.zeros(len(text), dtype=np.float64)
    for match in regex.finditer(text):
        inside[match.start() : match.end()] = 1.0
    return inside


def correlations(activations: np.ndarray, indicator: np.ndarray) -> np.ndarray:
    """Pearson r between each column of activations (T, U) and indicator (T,); 0 where either is constant."""
    a = np.asarray(activations, dtype=np.float64)
    y = np.asarray(indicator, dtype=np.float64)
    if a.ndim != 2 or y.shape != (a.shape[0],):
        raise ValueError(f"activations (T, U) and indicator (T,) must agree, got {a.shape} and {y.shape}")
    a = a - a.mean(axis=0)
    y = y - y.mean()
    scale = np.sqrt((a * a).sum(axis=0) * (y * y).sum())
    cov = a.T @ y
    return np.divide(cov, scale, out=np.zeros_like(cov), where=scale > 1e-12)


def rank_units(scores: np.ndarray, top: int) -> list[int]:
    """Indices of the ``top`` largest |scores|, largest first (ties: lower index first)."""
    order = np.lexsort((np.arange(len(scores)), -np.abs(scores)))
    return [int(i) for i in order[:top]]


# --- choosing what to show -------------------------------------------------------------------


@dataclass
class UnitView:
    """One unit to draw: its label, raw state per character, colour values in [-1, 1], and r."""

    layer: int
    unit: int
    values: np.ndarray
    colours: np.ndarray
    r: float | None = None
    spread: float | None = None

    @property
    def label(self) -> str:
        return f"layer {self.layer} · unit {self.unit}"


@dataclass
class Inspection:
    text: str
    state: str
    units: list[UnitView]
    pattern: str | None
    inside: np.ndarray | None
    description: str


def resolve_state(cell: str, state: str) -> str:
    if state == "auto":
        return "c" if CELL_TABLE[cell].has_cell_state else "h"
    if state not in ("h", "c"):
        raise ConfigError(f"--state {state!r}: choose auto, h or c")
    if state == "c" and not CELL_TABLE[cell].has_cell_state:
        raise ConfigError(f"--state c needs an LSTM, and this model is a {cell.upper()}, whose only state is h: use --state h")
    return state


def resolve_layers(layer: int | str | None, n_layers: int) -> list[int]:
    """The layer indices asked for: None is the last, 'all' every one, negatives count from the end."""
    if layer is None:
        return [n_layers - 1]
    if layer == "all":
        return list(range(n_layers))
    try:
        index = int(layer)
    except (TypeError, ValueError):
        raise ConfigError(f"--layer {layer!r}: give a layer number (0 is the first) or 'all'") from None
    if not -n_layers <= index < n_layers:
        raise ConfigError(f"--layer {index}: the model has {n_layers} layer(s), numbered 0 to {n_layers - 1}")
    return [index % n_layers]


def colour_values(values: np.ndarray, state: str, cell: str) -> np.ndarray:
    """Map a unit's raw states (T,) into [-1, 1] for colouring."""
    if state == "c":
        return np.tanh(values)
    if cell == "rnn_relu":  # h >= 0 and unbounded
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        return values / peak if peak > 0 else values
    return np.clip(values, -1.0, 1.0)


def encode_text(tokenizer: CharTokenizer, text: str) -> tuple[torch.Tensor, list[str]]:
    """Token ids (T,) of ``text``, checked, and the characters the model never saw."""
    if not text:
        raise PromptError("the text is empty: give at least one character to look at")
    if len(text) > MAX_TEXT_CHARS:
        raise PromptError(
            f"the text has {len(text):,} characters; the limit is {MAX_TEXT_CHARS:,} (the page holds one coloured "
            "copy of it per unit): pass an excerpt"
        )
    unknown = tokenizer.check_known(text, "the text")
    return torch.from_numpy(tokenizer.encode(text).astype(np.int64)), unknown


def inspect_text(
    model: CharRNN,
    tokenizer: CharTokenizer,
    text: str,
    units: Sequence[int] | None = None,
    pattern: str | None = None,
    top: int = DEFAULT_TOP,
    layer: int | str | None = None,
    state: str = "auto",
) -> Inspection:
    """Compute the states of ``text`` and pick the units to show (see the module docstring)."""
    cfg = model.config
    state = resolve_state(cfg.cell, state)
    layers = resolve_layers(layer, cfg.n_layers)
    if units is not None and not units:
        units = None
    if units is not None:
        if len(layers) != 1:
            raise ConfigError("--units picks units of one layer: give --layer N (or leave it out for the last layer)")
        if len(units) > MAX_UNITS:
            raise ConfigError(f"{len(units)} units asked for; the page shows at most {MAX_UNITS}")
        bad = [u for u in units if not 0 <= u < cfg.hidden_size]
        if bad:
            raise ConfigError(
                f"--units {bad[0]}: layer {layers[0]} has {cfg.hidden_size} units, numbered 0 to {cfg.hidden_size - 1}"
            )
    elif not 1 <= top <= MAX_UNITS:
        raise ConfigError(f"--top {top}: show between 1 and {MAX_UNITS} units")
    regex = compile_pattern(pattern) if pattern is not None else None
    ids, _unknown = encode_text(tokenizer, text)
    inside = pattern_indicator(text, regex) if regex is not None else None
    if inside is not None and inside.min() == inside.max():
        where = "no character" if inside.max() == 0 else "every character"
        raise ConfigError(
            f"--pattern {pattern!r} covers {where} of the text, so no unit can follow it: choose a pattern that "
            "matches some of the text but not all of it"
        )

    states = hidden_states(model, ids)
    candidates: list[tuple[int, int]] = []  # (layer, unit)
    columns = []
    for l in layers:
        values = states[l].c if state == "c" else states[l].h
        columns.append(values)
        candidates += [(l, u) for u in range(values.shape[1])]
    matrix = np.concatenate(columns, axis=1)  # (T, layers * H)
    r = correlations(matrix, inside) if inside is not None else None
    spread = matrix.std(axis=0)
    if units is not None:
        picked = [candidates.index((layers[0], u)) for u in units]
    elif r is not None:
        picked = rank_units(r, top)
    else:
        picked = rank_units(spread, top)

    views = [
        UnitView(
            layer=candidates[k][0],
            unit=candidates[k][1],
            values=matrix[:, k],
            colours=colour_values(matrix[:, k], state, cfg.cell),
            r=None if r is None else float(r[k]),
            spread=float(spread[k]),
        )
        for k in picked
    ]
    description = f"{cfg.cell.upper()} {cfg.n_layers}×{cfg.hidden_size}"
    return Inspection(text, state, views, pattern, inside, description)


# --- the page ------------------------------------------------------------------------------------


def colour(value: float) -> str:
    """#rrggbb for a value in [-1, 1]: blue below zero, white at zero, red above."""
    v = float(np.clip(value, -1.0, 1.0)) if np.isfinite(value) else 0.0
    end = _POSITIVE if v >= 0 else _NEGATIVE
    a = abs(v)
    return "#" + "".join(f"{round(255 + (e - 255) * a):02x}" for e in end)


def _shown(ch: str) -> str:
    """A character as the page shows it: control characters as their visible symbols, escaped."""
    if ch == "\n":
        return "↵"
    if ch == "\t":
        return ch
    code = ord(ch)
    if code < 0x20:
        return chr(0x2400 + code)
    if code == 0x7F:
        return "␡"
    return html.escape(ch, quote=True)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:16px 20px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px}
.meta{margin:2px 0;font-size:13px;color:#444}
code{background:#f3f3f3;padding:0 3px;border-radius:3px}
.legend{display:flex;align-items:center;gap:6px;font-size:12px;margin:6px 0 10px;color:#444}
.scale{width:220px;height:12px;border:1px solid #ccc;
 background:linear-gradient(to right,%(neg)s,#ffffff,%(pos)s)}
.u{text-decoration:underline;text-decoration-color:#333;text-underline-offset:2px}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:10px 18px}
section{border:1px solid #ddd;border-radius:4px;padding:4px 8px 6px;min-width:0}
h2{font-size:14px;margin:2px 0 4px;font-weight:600}
h2 .r{font-weight:400;color:#555;margin-left:8px}
pre{font:13px/1.45 ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;margin:0;white-space:pre-wrap;
 overflow-wrap:anywhere}
pre span.nl{color:#999}
"""


def render_html(inspection: Inspection, source: str = "") -> str:
    """The whole page as a string: every piece of the text and the options is escaped."""
    esc = html.escape
    text = inspection.text
    state_name = "cell state c (colour: tanh c)" if inspection.state == "c" else "hidden state h"
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # No script, no fetch: even a mistake in escaping could not run or load anything.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        f"<title>charrnn-inspect: {esc(source or inspection.description)}</title>",
        f"<style>{_CSS % {'neg': colour(-1), 'pos': colour(1)}}</style>",
        "</head><body><header>",
        "<h1>Inside the hidden state</h1>",
        f'<p class="meta">{esc(inspection.description)}'
        + (f" · checkpoint <code>{esc(source)}</code>" if source else "")
        + f" · {esc(state_name)} · {len(text):,} characters; each character is coloured by the unit's state after reading it</p>",
    ]
    if inspection.pattern is not None:
        head.append(
            f'<p class="meta">pattern <code>{esc(inspection.pattern)}</code>: <span class="u">underlined</span> characters '
            "are inside a match; r is the correlation between the unit's state and being inside a match</p>"
        )
    head.append(
        '<div class="legend"><span>−1</span><span class="scale"></span><span>+1</span>'
        "<span>(hover a character for its value)</span></div></header><main>"
    )
    parts = head
    inside = inspection.inside
    for view in inspection.units:
        extra = f"r = {view.r:+.2f}" if view.r is not None else f"std {view.spread:.2f}"
        opening = f'<section><h2>{esc(view.label)}<span class="r">{esc(extra)}</span></h2><pre>'
        cells = []
        for t, ch in enumerate(text):
            classes = []
            if inside is not None and inside[t]:
                classes.append("u")
            if ch == "\n":
                classes.append("nl")
            cls = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(
                f'<span{cls} style="background:{colour(view.colours[t])}" title="{view.values[t]:+.3f}">{_shown(ch)}</span>'
            )
            if ch == "\n":
                cells.append("\n")
        parts.append(opening + "".join(cells) + "</pre></section>")  # nothing else inside <pre>: it would show
    parts.append("</main></body></html>\n")
    return "\n".join(parts)

"""charrnn-inspect: hidden states, ranking units by a pattern, the HTML page, errors, a real browser."""

from __future__ import annotations

import html
import io
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO, make_text

from charrnn import CharTokenizer
from charrnn.cli.inspect import main
from charrnn.config import ModelConfig
from charrnn.errors import ConfigError, PromptError
from charrnn.generation.stepper import Stepper
from charrnn.inspector import (
    MAX_TEXT_CHARS,
    colour,
    correlations,
    hidden_states,
    inspect_text,
    pattern_indicator,
    rank_units,
    render_html,
)
from charrnn.model import CharRNN

VOWELS = "aeiou"
TRACKER = 5  # the unit built to follow "is a vowel"
TEXT = "the cat sat on a mat; <script>alert('x & y')</script> said the queen.\nthe end"


def tiny_model(cell="lstm", n_layers=1, vocab_size=20, hidden_size=8, seed=0) -> CharRNN:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab_size, cell=cell, n_layers=n_layers, hidden_size=hidden_size, embedding_size=6, dropout=0.0
    )
    return CharRNN(config).eval()


@pytest.fixture(scope="module")
def vowel_model():
    """A 2-layer LSTM whose layer-0 unit TRACKER holds c = +-0.995 for vowel / not vowel; the rest are small noise."""
    tokenizer = CharTokenizer.from_text(TEXT)
    model = tiny_model(n_layers=2, vocab_size=tokenizer.vocab_size)
    H = model.config.hidden_size
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)
        vowel = torch.tensor([ch in VOWELS for ch in tokenizer.chars], dtype=torch.float32)
        model.embedding.weight[:, 0] = vowel  # feature 0 of the embedding: "is a vowel"
        rnn = model.rnn
        i, f, g, o = (k * H + TRACKER for k in range(4))  # torch's gate order
        for row in (i, f, g, o):
            rnn.weight_ih_l0[row] = 0.0
            rnn.weight_hh_l0[row] = 0.0
            rnn.bias_hh_l0[row] = 0.0
        rnn.bias_ih_l0[i] = 20.0  # input gate open
        rnn.bias_ih_l0[f] = -20.0  # forget everything: c_t = g_t
        rnn.bias_ih_l0[o] = 20.0  # output gate open: h_t = tanh(c_t)
        rnn.weight_ih_l0[g, 0] = 6.0  # g = tanh(6 * vowel - 3) = +-0.995
        rnn.bias_ih_l0[g] = -3.0
    return model, tokenizer


# --- states --------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_states_of_every_layer_match_stepping_one_character_at_a_time(cell):
    model = tiny_model(cell=cell, n_layers=3, hidden_size=16, seed=3)
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    states = hidden_states(model, ids)
    stepper = Stepper(model)
    hidden = model.init_hidden(1)
    hs, cs = [], []
    for token in ids:
        _, hidden = stepper.step(token[None], hidden)
        h, c = hidden  # c is None but for an LSTM
        hs.append(h[:, 0].clone())
        cs.append(None if c is None else c[:, 0].clone())
    assert len(states) == 3
    for layer, got in enumerate(states):
        assert got.h.shape == (40, 16)
        np.testing.assert_allclose(got.h, torch.stack([h[layer] for h in hs]).numpy(), atol=1e-5)
        if cell == "lstm":
            np.testing.assert_allclose(got.c, torch.stack([c[layer] for c in cs]).numpy(), atol=1e-5)
        else:
            assert got.c is None


# --- ranking -------------------------------------------------------------------------------


def test_pattern_indicator_marks_the_characters_inside_matches():
    text = 'say "hi" or "" and x'
    inside = pattern_indicator(text, r'"[^"]*"')
    assert "".join(ch for ch, m in zip(text, inside) if m) == '"hi"""'
    assert inside.tolist()[:4] == [0, 0, 0, 0] and inside[4] == 1 and inside[7] == 1 and inside[8] == 0
    assert pattern_indicator("abc", r"x*").sum() == 0  # empty matches cover nothing


def test_correlations_are_pearson_r_and_zero_for_constant_units():
    rng = np.random.default_rng(0)
    y = (rng.random(200) < 0.3).astype(float)
    noise = rng.normal(size=200)
    acts = np.stack([2 * y + 1, -y, np.full(200, 0.7), noise, y + 0.5 * noise], axis=1)
    r = correlations(acts, y)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0) and r[2] == 0.0
    for k in (3, 4):
        assert r[k] == pytest.approx(np.corrcoef(acts[:, k], y)[0, 1], abs=1e-12)
    assert correlations(acts, np.zeros(200)).tolist() == [0.0] * 5  # an indicator without a match


def test_rank_units_orders_by_absolute_score_lowest_index_first_on_ties():
    assert rank_units(np.array([0.1, -0.9, 0.5, 0.9, -0.05]), 3) == [1, 3, 2]
    assert rank_units(np.array([0.2, 0.3]), 5) == [1, 0]


@pytest.mark.parametrize("state", ["c", "h"])
def test_the_unit_built_to_track_a_pattern_ranks_first(vowel_model, state):
    model, tokenizer = vowel_model
    result = inspect_text(model, tokenizer, TEXT, pattern=f"[{VOWELS}]", top=3, layer="all", state=state)
    best = result.units[0]
    assert (best.layer, best.unit) == (0, TRACKER)
    assert best.r > 0.99
    assert all(abs(u.r) < best.r for u in result.units[1:])
    # The values are that unit's states: tanh(3) = 0.995 (c), or tanh of that (h), signed by "is a vowel".
    inside = pattern_indicator(TEXT, f"[{VOWELS}]")
    expected = np.where(inside == 1, 1.0, -1.0) * (np.tanh(3.0) if state == "c" else np.tanh(np.tanh(3.0)))
    np.testing.assert_allclose(best.values, expected, atol=1e-3)
    np.testing.assert_allclose(best.colours, np.tanh(best.values) if state == "c" else best.values)
    # The default layer is the last one: the tracker (layer 0) is not among its units.
    last = inspect_text(model, tokenizer, TEXT, pattern=f"[{VOWELS}]", top=3, state=state)
    assert all(u.layer == 1 for u in last.units)


def test_explicit_units_are_shown_in_the_order_given_with_their_r(vowel_model):
    model, tokenizer = vowel_model
    result = inspect_text(model, tokenizer, TEXT, units=[TRACKER, 2], layer=0, pattern=f"[{VOWELS}]")
    assert [(u.layer, u.unit) for u in result.units] == [(0, TRACKER), (0, 2)]
    assert result.units[0].r > 0.99 and abs(result.units[1].r) < 0.9
    plain = inspect_text(model, tokenizer, TEXT, units=[3], layer=-1)
    assert [(u.layer, u.unit, u.r) for u in plain.units] == [(1, 3, None)]


def test_without_units_or_pattern_the_most_varying_units_are_shown(vowel_model):
    model, tokenizer = vowel_model
    result = inspect_text(model, tokenizer, TEXT, top=2, layer=0)
    assert result.state == "c"  # an LSTM shows its cell state unless told otherwise
    spreads = np.array([u.spread for u in inspect_text(model, tokenizer, TEXT, units=list(range(8)), layer=0).units])
    assert [u.unit for u in result.units] == list(np.argsort(-spreads)[:2])
    assert result.units[0].unit == TRACKER  # it swings between -0.995 and +0.995


# --- the page -------------------------------------------------------------------------------


def test_colour_scale():
    assert colour(0.0) == "#ffffff"
    assert colour(1.0) == "#d6604d" and colour(5.0) == "#d6604d"
    assert colour(-1.0) == "#4393c3"
    assert colour(float("nan")) == "#ffffff"
    assert colour(0.5) not in (colour(0.0), colour(1.0), colour(-0.5))


def test_page_escapes_the_text_and_the_options(vowel_model):
    model, tokenizer = vowel_model
    pattern = "<b>|&"
    result = inspect_text(model, tokenizer, TEXT, pattern=r"<script>|&|[aeiou]", top=2, layer="all")
    result.pattern = pattern
    page = render_html(result, source='ck"<img src=x>')
    assert "<script" not in page and "<img" not in page and "<b>" not in page
    assert ">&lt;</span>" in page and ">&gt;</span>" in page and ">&amp;</span>" in page and ">&#x27;</span>" in page
    assert "&lt;b&gt;|&amp;" in page
    assert "ck&quot;&lt;img src=x&gt;" in page
    assert "http" not in page.replace("http-equiv", "")  # nothing loaded from anywhere
    assert f"background:linear-gradient(to right,{colour(-1)},#ffffff,{colour(1)})" in page  # the legend
    assert "content=\"default-src 'none'; style-src 'unsafe-inline'\"" in page  # and no script may run
    # Each unit's text, with the tags removed and entities decoded, is the text itself
    # (a newline shows as a visible mark before the line break).
    blocks = re.findall(r"<pre>(.*?)</pre>", page, re.S)
    assert len(blocks) == 2
    for block, unit in zip(blocks, result.units):
        assert html.unescape(re.sub(r"<[^>]*>", "", block)) == TEXT.replace("\n", "↵\n")
        spans = re.findall(r'<span([^>]*)style="background:(#[0-9a-f]{6})"[^>]*>(.*?)</span>', block, re.S)
        assert html.unescape("".join(s for _, _, s in spans)) == TEXT.replace("\n", "↵")
        assert [c for _, c, _ in spans] == [colour(v) for v in unit.colours]
        assert [' class="u' in a for a, _, _ in spans] == [bool(m) for m in result.inside]  # matches underlined


def test_control_characters_are_shown_as_symbols(vowel_model):
    model, tokenizer = vowel_model
    page = render_html(inspect_text(model, tokenizer, "a\x00b\x1bc", units=[0]))
    assert "\x00" not in page and "\x1b" not in page and "␀" in page and "␛" in page


# --- mistakes -------------------------------------------------------------------------------


def test_a_text_at_the_limit_is_accepted(vowel_model):
    model, tokenizer = vowel_model
    result = inspect_text(model, tokenizer, ("the cat " * MAX_TEXT_CHARS)[:MAX_TEXT_CHARS], units=[TRACKER], layer=0)
    assert result.units[0].values.shape == (MAX_TEXT_CHARS,)


@pytest.mark.parametrize(
    "text, options, error, match",
    [
        ("", {}, PromptError, "empty"),
        ("a" * (MAX_TEXT_CHARS + 1), {}, PromptError, "limit is 10,000"),
        ("ZZZ###", {}, PromptError, "only of characters the model never saw"),
        (TEXT, {"pattern": "(unclosed"}, ConfigError, "not a valid regular expression"),
        (TEXT, {"pattern": "xyzzy"}, ConfigError, "covers no character"),
        (TEXT, {"pattern": r"[\s\S]"}, ConfigError, "covers every character"),
        (TEXT, {"units": [8]}, ConfigError, "numbered 0 to 7"),
        (TEXT, {"units": [-1]}, ConfigError, "numbered 0 to 7"),
        (TEXT, {"units": [1], "layer": "all"}, ConfigError, "one layer"),
        (TEXT, {"units": list(range(33))}, ConfigError, "at most 32"),
        (TEXT, {"layer": 2}, ConfigError, "numbered 0 to 1"),
        (TEXT, {"layer": "top"}, ConfigError, "layer number"),
        (TEXT, {"top": 0}, ConfigError, "between 1 and 32"),
    ],
)
def test_mistakes_raise_a_sentence_naming_them(vowel_model, text, options, error, match):
    model, tokenizer = vowel_model
    with pytest.raises(error, match=match):
        inspect_text(model, tokenizer, text, **options)


def test_cell_state_needs_an_lstm():
    tokenizer = CharTokenizer.from_text(TEXT)
    gru = tiny_model(cell="gru", vocab_size=tokenizer.vocab_size)
    with pytest.raises(ConfigError, match="only state is h"):
        inspect_text(gru, tokenizer, TEXT, state="c")
    assert inspect_text(gru, tokenizer, TEXT, top=1).state == "h"


# --- the command line ----------------------------------------------------------------------------


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(make_text(seed=7, n_chars=300) + '\n<script>alert("&")</script>\n', encoding="utf-8")
    return path


def test_cli_writes_the_page_and_prints_the_ranking(trained_run, text_file, tmp_path, capsys):
    out = tmp_path / "sub" / "page.html"
    code = main(
        [
            "--checkpoint",
            str(trained_run.run_dir),
            "--text",
            str(text_file),
            "--pattern",
            "(?m)^[A-Z]+:$",
            "--top",
            "3",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.count("r = ") == 3 and f"wrote {out}" in captured.out
    assert "never saw" in captured.err  # <, >, ", & are not in the tiny corpus
    page = out.read_text(encoding="utf-8")
    assert page.count("<section>") == 3 and ">&lt;</span>" in page and ">&amp;</span>" in page
    assert "<script" not in page


@pytest.mark.parametrize(
    "args, match",
    [
        (["--text", "MISSING"], "no such file"),
        (["--pattern", "("], "not a valid regular expression"),
        (["--units", "999"], "numbered 0 to 31"),
        (["--state", "c", "--layer", "5"], "numbered 0 to 1"),
        (["--text", "BIG"], "more than 10,000 characters"),
        (["--text", "BINARY"], "not UTF-8"),
    ],
)
def test_cli_mistakes_print_one_line_and_exit_2(trained_run, text_file, tmp_path, capsys, args, match):
    big = tmp_path / "big.txt"
    big.write_text("a" * (MAX_TEXT_CHARS + 5), encoding="utf-8")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"abc\xff\xfe\x00")
    args = [{"MISSING": str(tmp_path / "missing.txt"), "BIG": str(big), "BINARY": str(binary)}.get(a, a) for a in args]
    if "--text" not in args:
        args += ["--text", str(text_file)]
    code = main(["--checkpoint", str(trained_run.run_dir), "--out", str(tmp_path / "x.html"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and re.search(match, err) and "Traceback" not in err
    assert not (tmp_path / "x.html").exists()


def test_cli_reads_the_text_from_stdin(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("KING:\nthe cat sat.\n" * 900))  # past the limit
    assert main(["--checkpoint", str(trained_run.run_dir), "--text", "-", "--out", str(tmp_path / "x.html")]) == 2
    assert "more than 10,000 characters" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("KING:\nthe cat sat.\n"))
    assert main(["--checkpoint", str(trained_run.run_dir), "--text", "-", "--out", str(tmp_path / "x.html")]) == 0
    assert "19 characters" in capsys.readouterr().out


@pytest.mark.parametrize("units", [["3", "1"], ["3,1"], ["3", "--units", "1"]])
def test_cli_units_of_a_chosen_layer(trained_run, text_file, tmp_path, capsys, units):
    out = tmp_path / "page.html"
    code = main(
        [
            "--checkpoint",
            str(trained_run.run_dir),
            "--text",
            str(text_file),
            "--layer",
            "-2",
            "--state",
            "h",
            "--units",
            *units,
            "--out",
            str(out),
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0].startswith("layer 0 · unit 3: std ") and lines[1].startswith("layer 0 · unit 1: std ")
    assert "2 unit(s)" in lines[2] and "state h" in lines[2]


def test_python_m_charrnn_inspect(trained_run, text_file, tmp_path, subprocess_env):
    out = tmp_path / "page.html"
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "charrnn",
            "inspect",
            "--checkpoint",
            str(trained_run.best),
            "--text",
            str(text_file),
            "--units",
            "0,1",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "layer 1 · unit 1" in proc.stdout and out.read_text(encoding="utf-8").count("<section>") == 2


# --- a real browser ----------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed: apt-get update && apt-get install -y chromium (Debian; as root)",
)


def run_chromium(tmp_path, *args):
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]
    proc = subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@needs_chromium
def test_page_renders_in_a_real_browser(trained_run, text_file, tmp_path):
    from PIL import Image

    from charrnn.checkpoint import load_checkpoint

    ckpt = load_checkpoint(trained_run.run_dir)
    text = text_file.read_text(encoding="utf-8")
    # The pattern goes into the page's header whole: its <script> must stay text there too.
    result = inspect_text(ckpt.model, ckpt.tokenizer, text, pattern="(?m)^[A-Z]+:$|<script>|&", top=2)
    page = tmp_path / "page.html"
    page.write_text(render_html(result, source=str(ckpt.path)), encoding="utf-8")

    dom = run_chromium(tmp_path, "--dump-dom", page.as_uri())
    assert "Inside the hidden state" in dom
    assert "<script" not in dom  # the <script> of the text and the pattern stayed text: no element was made
    assert "<code>(?m)^[A-Z]+:$|&lt;script&gt;|&amp;</code>" in dom
    blocks = re.findall(r"<pre>(.*?)</pre>", dom, re.S)
    assert len(blocks) == 2
    for block, unit in zip(blocks, result.units):
        assert html.unescape(re.sub(r"<[^>]*>", "", block)) == text.replace("\n", "↵\n")
        spans = re.findall(r'<span[^>]*style="background:\s*(#[0-9a-f]{6})[^"]*"[^>]*>(.*?)</span>', block, re.S)
        assert html.unescape("".join(s for _, s in spans)) == text.replace("\n", "↵")
        assert [c for c, _ in spans] == [colour(v) for v in unit.colours]
    assert len({c for c, _ in re.findall(r"background:\s*(#[0-9a-f]{6})()", dom)}) > 20  # many shades

    shot = tmp_path / "page.png"
    run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,800", page.as_uri())
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape == (800, 1200, 3)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    reddish = ((r - b > 40) & (r - g > 20)).sum()
    bluish = ((b - r > 40) & (b - g > 0)).sum()
    # The legend alone is about 2,600 coloured pixels; the coloured characters give far more.
    assert reddish + bluish > 20_000, (reddish, bluish)

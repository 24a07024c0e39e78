"""charrnn-plot: metrics.jsonl read, drawn as two panels (steps, time), written as a PNG."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import PYTHON, REPO

from charrnn.cli.plot import main
from charrnn.training.plot import MetricsError, make_figure, moving_average, plot_run, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, steps=120, seconds_per_step=2.5, eval_every=40, extra_lines=()):
    """A metrics.jsonl as train.py writes it: a falling loss, an evaluation every eval_every steps."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        elapsed = round((step - 1) * seconds_per_step, 3)
        lines.append({"step": step, "loss": 4.0 * math.exp(-step / 40) + 1.2, "lr": 1e-3, "elapsed": elapsed})
        if step % eval_every == 0:
            val = 4.0 * math.exp(-step / 40) + 1.4
            lines.append({"step": step, "val_loss": val, "val_bpc": val / math.log(2), "elapsed": elapsed + 1.0})
    text = "".join(json.dumps(r) + "\n" for r in lines) + "".join(extra_lines)
    (run_dir / "metrics.jsonl").write_text(text, encoding="utf-8")
    return lines


def test_metrics_are_read_into_training_and_validation_columns(tmp_path):
    lines = write_metrics(tmp_path / "run", extra_lines=('["not a record"]\n', '{"step": 3}\n', '{"step": 121, "lo'))
    m = read_metrics(tmp_path / "run")
    train = [r for r in lines if "loss" in r]
    val = [r for r in lines if "val_loss" in r]
    assert m.step == [r["step"] for r in train] and m.loss == [r["loss"] for r in train]
    assert m.elapsed == [r["elapsed"] for r in train]
    assert m.val_step == [40, 80, 120] and m.val_loss == [r["val_loss"] for r in val]
    assert m.val_elapsed == [r["elapsed"] for r in val]


def test_a_run_with_only_evaluations_is_plotted(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 50, "val_loss": 2.5, "val_bpc": 3.6, "elapsed": 9.0}\n')
    m = read_metrics(run)
    assert (m.step, m.val_step, m.val_loss, m.val_elapsed) == ([], [50], [2.5], [9.0])
    assert plot_run(run).exists()


def test_the_figure_has_loss_against_steps_and_against_time(tmp_path):
    write_metrics(tmp_path / "run", steps=120, seconds_per_step=2.5)  # 300 s: the time axis is in minutes
    m = read_metrics(tmp_path / "run")
    m.val_loss = [2.0, 1.5, 1.7]  # the best is not the last
    fig = make_figure(m, title="run")
    by_step, by_time = fig.axes[:2]
    assert by_step.get_xlabel() == "step" and by_time.get_xlabel() == "training time (minutes)"
    for ax, x, val_x in ((by_step, m.step, m.val_step), (by_time, [e / 60 for e in m.elapsed], [e / 60 for e in m.val_elapsed])):
        raw, smooth, val = ax.get_lines()
        np.testing.assert_allclose(raw.get_xdata(), x)
        np.testing.assert_allclose(raw.get_ydata(), m.loss)
        assert smooth.get_label() == "train loss, mean of 7 steps"  # 120 steps: a window of 120 // 20, made odd
        np.testing.assert_allclose(smooth.get_ydata(), moving_average(m.loss, 7))
        np.testing.assert_allclose(val.get_xdata(), val_x)
        np.testing.assert_allclose(val.get_ydata(), m.val_loss)
        assert ax.get_yscale() == "log"
    assert "best validation loss 1.5000 nats (2.164 bpc)" in fig._suptitle.get_text()
    short = read_metrics(tmp_path / "run")
    short.elapsed = [e / 10 for e in short.elapsed]
    short.val_elapsed = [e / 10 for e in short.val_elapsed]
    in_seconds = make_figure(short).axes[1]
    assert in_seconds.get_xlabel() == "training time (seconds)"
    np.testing.assert_allclose(in_seconds.get_lines()[2].get_xdata(), short.val_elapsed)


def test_moving_average_is_centred_and_skips_non_finite_values():
    values = [1.0, 2.0, 3.0, 10.0, 5.0, 6.0, 7.0]
    assert moving_average(values, 3) == pytest.approx([1.0, 2.0, 5.0, 6.0, 7.0, 6.0, 7.0])
    assert moving_average(values, 1) == values
    assert moving_average([1.0, float("nan"), 3.0], 3)[1] == pytest.approx(2.0)


def test_plot_run_writes_a_png_in_the_run_dir(tmp_path):
    from PIL import Image

    write_metrics(tmp_path / "run")
    out = plot_run(tmp_path / "run")
    assert out == tmp_path / "run" / "training.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert Image.open(out).size == (1100, 420)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl", "training.png"]  # no temp file left


def test_plot_of_a_real_training_run(trained_run, tmp_path):
    out = plot_run(trained_run.run_dir, tmp_path / "plots" / "t.png")
    assert out == tmp_path / "plots" / "t.png" and out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "setup, match",
    [
        ("missing", "not found"),
        ("file", "not a directory"),
        ("no_metrics", "holds no metrics.jsonl"),
        ("empty", "holds no training records"),
        ("garbage", "holds no training records"),
    ],
)
def test_a_run_without_metrics_is_a_clear_error(tmp_path, capsys, setup, match):
    run = tmp_path / "run"
    if setup == "file":
        run.write_text("x")
    elif setup != "missing":
        run.mkdir()
        (run / "best").mkdir()
        if setup == "empty":
            (run / "metrics.jsonl").write_text("")
        elif setup == "garbage":
            (run / "metrics.jsonl").write_text('{"step": 1, "lo\n[1, 2]\n')
    with pytest.raises(MetricsError, match=match):
        plot_run(run)
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err


def test_without_matplotlib_plot_run_returns_none_and_the_cli_says_how_to_install(tmp_path, monkeypatch, capsys):
    write_metrics(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert plot_run(tmp_path / "run") is None
    assert not (tmp_path / "run" / "training.png").exists()
    assert main([str(tmp_path / "run")]) == 2
    assert "pip install 'charrnn-lm[plot]'" in capsys.readouterr().err


def test_python_m_charrnn_plot(tmp_path, subprocess_env):
    write_metrics(tmp_path / "run")
    out = tmp_path / "curve.png"
    proc = subprocess.run(
        [PYTHON, "-m", "charrnn", "plot", str(tmp_path / "run"), "--out", str(out)],
        cwd=REPO,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and out.read_bytes()[:8] == PNG_MAGIC

"""Pictures of training: loss against steps and against time, from a run's metrics.jsonl.

``train.py`` appends one JSON line per step (``{"step", "loss", "lr", "elapsed"}``) and
one per evaluation (``{"step", "val_loss", "val_bpc", "elapsed"}``) to
``RUN_DIR/metrics.jsonl``. :func:`plot_run` draws them as a PNG with two panels (loss
against steps, loss against training time), the training loss faint with a moving
average over it and the validation loss as points joined by a line.

matplotlib is an optional extra (``pip install 'charrnn-lm[plot]'``): without it,
:func:`plot_run` returns None and does nothing. Figures are drawn on the Agg canvas
directly, without pyplot, so plotting never changes the caller's matplotlib backend
and needs no display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_write, parse_json, read_bytes
from ..errors import MetricsError

METRICS_FILE = "metrics.jsonl"
MAX_METRICS_BYTES = 1 << 30  # a line per step: millions of steps fit


def read_metrics_lines(path: Path) -> list[str]:
    """The lines of a run's ``metrics.jsonl`` (a regular file, read with a bound; ``OSError`` otherwise).

    Undecodable bytes become U+FFFD: such a line fails to parse and is skipped, as a
    line cut off by a killed process is.
    """
    return read_bytes(path, MAX_METRICS_BYTES).decode("utf-8", errors="replace").splitlines()


PLOT_FILE = "training.png"
LN2 = math.log(2)


@dataclass
class Metrics:
    """A run's records as columns: training steps and evaluations."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    elapsed: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_elapsed: list[float] = field(default_factory=list)


def _number(record: dict[str, Any], key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_metrics(run_dir: str | Path) -> Metrics:
    """Parse ``RUN_DIR/metrics.jsonl``; lines that are not records (a cut-off last line) are skipped."""
    run_dir = Path(run_dir).expanduser()
    path = run_dir / METRICS_FILE
    if not run_dir.exists():
        raise MetricsError(f"run directory {run_dir} not found: pass the folder a training run wrote (its --out)")
    if not run_dir.is_dir():
        raise MetricsError(f"{run_dir} is not a directory: pass a training run's folder, which holds {METRICS_FILE}")
    try:
        lines = read_metrics_lines(path)
    except FileNotFoundError:
        raise MetricsError(
            f"{run_dir} holds no {METRICS_FILE}: it is not a training run's folder, or the run stopped before its first step"
        ) from None
    except OSError as exc:
        raise MetricsError(f"cannot read {path}: {exc.strerror or exc}") from None
    metrics = Metrics()
    for line in lines:
        try:
            record = parse_json(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(record, dict):
            continue
        step, elapsed = _number(record, "step"), _number(record, "elapsed")
        if step is None or elapsed is None:
            continue
        loss, val = _number(record, "loss"), _number(record, "val_loss")
        if loss is not None:
            metrics.step.append(int(step))
            metrics.loss.append(loss)
            metrics.elapsed.append(elapsed)
        if val is not None:
            metrics.val_step.append(int(step))
            metrics.val_loss.append(val)
            metrics.val_elapsed.append(elapsed)
    if not metrics.step and not metrics.val_step:
        raise MetricsError(f"{path} holds no training records: the run stopped before its first step")
    return metrics


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centred moving mean of ``window`` values; non-finite values are left out.

    Centred, not trailing, so the smoothed curve does not lag behind a falling loss;
    near the ends the window shrinks symmetrically (the first value is its own mean).
    """
    half = max(0, window // 2)
    finite = [v if math.isfinite(v) else 0.0 for v in values]
    ok = [1 if math.isfinite(v) else 0 for v in values]
    sums, counts = [0.0], [0]
    for v, k in zip(finite, ok):
        sums.append(sums[-1] + v)
        counts.append(counts[-1] + k)
    out = []
    for i in range(len(values)):
        reach = min(half, i, len(values) - 1 - i)
        lo, hi = i - reach, i + reach + 1
        n = counts[hi] - counts[lo]
        out.append((sums[hi] - sums[lo]) / n if n else math.nan)
    return out


def _time_axis(seconds: Sequence[float]) -> tuple[list[float], str]:
    """Elapsed seconds in the unit that reads best: seconds, minutes or hours."""
    longest = max(seconds, default=0.0)
    if longest >= 3 * 3600:
        return [s / 3600 for s in seconds], "training time (hours)"
    if longest >= 180:
        return [s / 60 for s in seconds], "training time (minutes)"
    return list(seconds), "training time (seconds)"


def make_figure(metrics: Metrics, title: str = ""):
    """A matplotlib Figure (Agg canvas) with the two panels: loss against steps, and against time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator, NullLocator

    fig = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    window = max(1, min(51, len(metrics.loss) // 20) | 1)  # odd: centred on each step
    smooth = moving_average(metrics.loss, window)
    # One time unit for both curves.
    all_time, time_label = _time_axis(metrics.elapsed + metrics.val_elapsed)
    time_x, val_time_x = all_time[: len(metrics.elapsed)], all_time[len(metrics.elapsed) :]
    for ax, x, val_x, label in (
        (by_step, metrics.step, metrics.val_step, "step"),
        (by_time, time_x, val_time_x, time_label),
    ):
        if metrics.loss:
            ax.plot(x, metrics.loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss")
            ax.plot(
                x,
                smooth,
                color="tab:blue",
                linewidth=1.6,
                label=f"train loss, mean of {window} steps" if window > 1 else "_nolegend_",
            )
        if metrics.val_loss:
            ax.plot(val_x, metrics.val_loss, color="tab:orange", marker="o", markersize=4, linewidth=1.6, label="validation loss")
        ax.set_xlabel(label)
        # Log scale: the first steps (about ln V nats) do not squash the part that matters.
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    for axis in (by_step.yaxis,):  # shared with by_time
        axis.set_major_locator(MaxNLocator(nbins=10))  # plain numbers (1.5, 2.0, ...), not powers of ten
        axis.set_major_formatter(FormatStrFormatter("%.1f"))
        axis.set_minor_locator(NullLocator())
    by_step.set_ylabel("loss (nats per character)")
    bpc = by_time.secondary_yaxis("right", functions=(lambda n: n / LN2, lambda b: b * LN2))
    bpc.set_ylabel("bits per character")
    bpc.yaxis.set_major_locator(MaxNLocator(nbins=10))
    bpc.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    bpc.yaxis.set_minor_locator(NullLocator())
    by_step.legend(loc="upper right", fontsize=9)
    finite_val = [v for v in metrics.val_loss if math.isfinite(v)]
    if finite_val:
        best = min(finite_val)
        best_text = f"best validation loss {best:.4f} nats ({best / LN2:.3f} bpc)"
        title = f"{title}: {best_text}" if title else best_text
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Draw ``RUN_DIR/metrics.jsonl`` as a PNG (default ``RUN_DIR/training.png``) and return its path.

    Returns None, doing nothing, when matplotlib is not installed. Raises
    :class:`MetricsError` when the run directory has no metrics to plot.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    run_dir = Path(run_dir).expanduser()
    metrics = read_metrics(run_dir)
    out = Path(out).expanduser() if out is not None else run_dir / PLOT_FILE
    fig = make_figure(metrics, title=run_dir.resolve().name)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out) as f:  # a reader never sees half a PNG
            fig.savefig(f, format="png")
    except OSError as exc:
        raise MetricsError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out

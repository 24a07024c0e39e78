"""What a training run reports, and where: the trainer calls these hooks and knows nothing else.

As in minGPT's trainer, the loop only trains, evaluates and saves; everything that
writes to the terminal or to extra files hangs on a :class:`Callback`:

- :class:`MetricsLog` appends ``RUN/metrics.jsonl`` (one line per step and per evaluation);
- :class:`ProgressBar` draws the tqdm bar;
- :class:`ConsoleReport` prints the run's first line, each evaluation, notes, and the end;
- :class:`PreviewText` prints a sample after each evaluation, from a function it is given
  (the command line passes one from ``charrnn.generation``, which training does not import);
- :class:`PlotAtEnd` draws ``RUN/training.png`` when the run ends;
- :class:`TensorBoardLog` (``--log tensorboard``) writes TensorBoard event files to
  ``RUN/tensorboard/`` as the run goes, to watch it live.

:func:`default_callbacks` is the set a run gets unless it is given its own.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from .._io import atomic_write, open_append, parse_json
from ..config import TrainConfig
from ..data.corpus import corpus_name
from ..errors import TrainingError
from ..evaluation import LN2
from ..model import CharRNN
from ..tokenizer import CharTokenizer
from .plot import METRICS_FILE, plot_run, read_metrics_lines

if TYPE_CHECKING:
    from .trainer import Trainer, TrainResult

# model, tokenizer, device, length, seed -> text: how PreviewText gets its sample.
PreviewFunction = Callable[[CharRNN, CharTokenizer, torch.device, int, int], str]


class Callback:
    """The trainer's hooks; each does nothing unless a subclass overrides it.

    Only the main process (rank 0 under torchrun) calls them.
    """

    def on_start(self, trainer: Trainer) -> None:
        """Before the first step (after a resume's state is restored)."""

    def on_step(self, trainer: Trainer, loss: float) -> None:
        """After each optimisation step; ``loss`` in nats per character."""

    def on_evaluation(self, trainer: Trainer, val_loss: float, improved: bool) -> None:
        """After an evaluation, before its checkpoints are written."""

    def on_checkpoint(self, trainer: Trainer, val_loss: float, improved: bool) -> None:
        """After an evaluation's checkpoints (``last``, and ``best`` when ``improved``) are written."""

    def on_message(self, trainer: Trainer | None, text: str) -> None:
        """A warning or a note for the user (``text`` starts with ``warning:`` or ``note:``)."""

    def on_signal(self, trainer: Trainer, signum: int, repeated: bool) -> None:
        """A SIGINT or SIGTERM came: the first asks the run to stop after this step and save;
        a ``repeated`` one, after the first, is ignored so that the save completes."""

    def on_end(self, trainer: Trainer, result: TrainResult) -> None:
        """After the last save; ``result`` says where the checkpoints are and why the run ended."""

    def on_close(self, trainer: Trainer) -> None:
        """When the run is over, however it ended (also by an exception)."""


class MetricsLog(Callback):
    """``RUN/metrics.jsonl``: ``{"step", "loss", "lr", "elapsed"}`` per step,
    ``{"step", "val_loss", "val_bpc", "elapsed"}`` per evaluation (and ``val_loss_by_corpus`` where
    several corpora validate), and
    ``{"step", "restart", "resumed_from"}`` when torchrun restarted the job (the step it went on from)."""

    def on_start(self, trainer: Trainer) -> None:
        self.path = trainer.run_dir / METRICS_FILE
        self._trim(trainer.step)
        if trainer.restart:
            resumed = str(trainer.resumed_from) if trainer.resumed_from else None
            self._log(trainer, {"step": trainer.step, "restart": trainer.restart, "resumed_from": resumed})

    def _trim(self, step: int) -> None:
        """On resume, drop metrics the interrupted run logged after its checkpoint.

        A process killed mid-write can leave a cut-off last line; it is dropped too.
        """
        if not self.path.exists():
            return
        kept = []
        try:
            for line in read_metrics_lines(self.path):
                try:
                    record = parse_json(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(record, dict) and isinstance(record.get("step", 0), int) and record.get("step", 0) <= step:
                    kept.append(line)
            with atomic_write(self.path, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in kept))
        except OSError as exc:
            raise TrainingError(f"cannot rewrite {self.path} for the resumed run: {exc.strerror or exc}") from None

    def _log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        try:
            with open_append(self.path) as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise TrainingError(
                f"could not write {self.path}: {exc.strerror or exc}; free some disk space, then resume "
                f"from {trainer.run_dir / 'last'}"
            ) from None

    def on_step(self, trainer: Trainer, loss: float) -> None:
        lr = trainer.optimizer.param_groups[0]["lr"]
        self._log(trainer, {"step": trainer.step, "loss": loss, "lr": lr, "elapsed": round(trainer.elapsed, 3)})

    def on_evaluation(self, trainer: Trainer, val_loss: float, improved: bool) -> None:
        record = {"step": trainer.step, "val_loss": val_loss, "val_bpc": val_loss / LN2, "elapsed": round(trainer.elapsed, 3)}
        if trainer.val_by_corpus:
            record["val_loss_by_corpus"] = dict(trainer.val_by_corpus)
        self._log(trainer, record)


class ProgressBar(Callback):
    """A tqdm bar over the budget, with the step, the loss, the best validation loss and the speed."""

    EVERY = 10  # steps between updates

    bar: tqdm | None = None

    def on_step(self, trainer: Trainer, loss: float) -> None:
        if self.bar is None:  # made at the first step, so that the run's first line comes before it
            self.bar = tqdm(
                total=1000,
                disable=None,
                dynamic_ncols=True,
                leave=False,
                bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}",
            )
            self.window_start, self.window_steps = time.perf_counter(), 0
        self.window_steps += 1
        if trainer.step % self.EVERY:
            return
        now = time.perf_counter()
        speed = self.window_steps * trainer.chars_per_step / (now - self.window_start)
        self.window_start, self.window_steps = now, 0
        self.bar.n = int(1000 * min(1.0, trainer.progress()))
        self.bar.set_postfix_str(f" step {trainer.step} loss {loss:.3f} best val {trainer.best_val:.3f} {speed:,.0f} chars/s")

    def on_end(self, trainer: Trainer, result: TrainResult) -> None:
        self.on_close(trainer)  # before the last lines are printed

    def on_close(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ConsoleReport(Callback):
    """The run's first line and last lines (stderr), one line per evaluation (stdout), notes (stderr)."""

    def on_start(self, trainer: Trainer) -> None:
        print(f"charrnn: {trainer.plan.reason}", file=sys.stderr)
        print(trainer.describe(), file=sys.stderr)

    def on_checkpoint(self, trainer: Trainer, val_loss: float, improved: bool) -> None:
        each = ", ".join(f"{corpus_name(name)} {loss:.4f}" for name, loss in trainer.val_by_corpus.items())
        tqdm.write(
            f"step {trainer.step:>6} | val {val_loss:.4f} nats/char ({val_loss / LN2:.3f} bpc)"
            f"{f' [{each}]' if each else ''}{' (best)' if improved else ''} | {trainer.elapsed:.0f} s"
        )

    def on_message(self, trainer: Trainer | None, text: str) -> None:
        print(text, file=sys.stderr)

    def on_signal(self, trainer: Trainer, signum: int, repeated: bool) -> None:
        if repeated:
            # Reported once the save is done (see StopSignal), so it says what was done, not what will be.
            print(f"\n{signal.Signals(signum).name} again: ignored, so that the checkpoint save completes", file=sys.stderr)
            return
        # Under torchrun a SIGTERM often means another worker died: the save needs every process.
        also = " if every process is still there" if trainer.dist.elastic else ""
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint{also}...", file=sys.stderr)

    def on_end(self, trainer: Trainer, result: TrainResult) -> None:
        print(
            f"charrnn: {result.stop_reason} at step {result.step}; best val {result.best_val_loss:.4f} nats/char "
            f"({result.best_val_loss / LN2:.3f} bpc)\n"
            f"  checkpoints: {result.best} (best), {result.last} (last, resumable)"
            + (f"\n  plot:    {result.plot}" if result.plot else ""),
            file=sys.stderr,
        )


class PreviewText(Callback):
    """After each evaluation, ``config.sample_chars`` characters sampled from the model, indented."""

    def __init__(self, preview: PreviewFunction):
        self.preview = preview

    def on_checkpoint(self, trainer: Trainer, val_loss: float, improved: bool) -> None:
        length = trainer.config.sample_chars
        if not length:
            return
        text = self.preview(trainer.model, trainer.tokenizer, trainer.device, length, trainer.config.seed)
        trainer.model.train()  # sampling put it in eval mode
        tqdm.write("    " + text.replace("\n", "\n    "))


class PlotAtEnd(Callback):
    """``RUN/training.png`` from the metrics, when matplotlib is installed; never fails a finished run."""

    def on_end(self, trainer: Trainer, result: TrainResult) -> None:
        try:
            result.plot = plot_run(result.run_dir)
        except Exception as exc:  # a picture is a bonus: report, do not fail the run
            trainer.message(f"note: no training plot ({exc})")


class TensorBoardLog(Callback):
    """``RUN/tensorboard/``: TensorBoard event files, written as the run goes.

    Scalars ``train/loss`` (nats/char) and ``train/lr`` every step, ``train/chars_per_second``
    every ``EVERY`` steps (training time only, as ``--max-time`` counts it), ``val/loss``
    (nats/char) and ``val/bpc`` at each evaluation, and a sample text (``sample``, when a
    ``preview`` function is given and ``sample_chars`` > 0). The file is flushed after every
    evaluation and every ``FLUSH_SECONDS``, so ``tensorboard --logdir RUN`` follows the run.
    A resumed run drops the events the interrupted one logged after its checkpoint.
    """

    FOLDER = "tensorboard"
    EVERY = 10
    FLUSH_SECONDS = 5

    def __init__(self, preview: PreviewFunction | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrainingError(
                "--log tensorboard needs the tensorboard package: pip install 'charrnn-lm[tensorboard]' (or pip install tensorboard)"
            ) from None
        self._writer_class = SummaryWriter
        self.preview = preview
        self.writer: Any = None

    def on_start(self, trainer: Trainer) -> None:
        self.writer = self._writer_class(
            log_dir=str(trainer.run_dir / self.FOLDER),
            purge_step=trainer.step + 1 if trainer.step else None,  # on resume: events after the checkpoint are dropped
            flush_secs=self.FLUSH_SECONDS,
        )
        self.window = (trainer.step, trainer.elapsed)

    def on_step(self, trainer: Trainer, loss: float) -> None:
        step = trainer.step
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", trainer.optimizer.param_groups[0]["lr"], step)
        if step % self.EVERY == 0:
            steps, seconds = step - self.window[0], trainer.elapsed - self.window[1]
            if seconds > 0:
                self.writer.add_scalar("train/chars_per_second", steps * trainer.chars_per_step / seconds, step)
            self.window = (step, trainer.elapsed)

    def on_evaluation(self, trainer: Trainer, val_loss: float, improved: bool) -> None:
        self.writer.add_scalar("val/loss", val_loss, trainer.step)
        self.writer.add_scalar("val/bpc", val_loss / LN2, trainer.step)
        for name, loss in trainer.val_by_corpus.items():
            self.writer.add_scalar(f"val/loss/{corpus_name(name)}", loss, trainer.step)

    def on_checkpoint(self, trainer: Trainer, val_loss: float, improved: bool) -> None:
        length = trainer.config.sample_chars
        if self.preview is not None and length:
            text = self.preview(trainer.model, trainer.tokenizer, trainer.device, length, trainer.config.seed)
            trainer.model.train()  # sampling put it in eval mode
            # TensorBoard shows text as Markdown: indented by four spaces, it is a code block, newlines kept.
            self.writer.add_text("sample", "    " + text.replace("\n", "\n    "), trainer.step)
        self.writer.flush()

    def on_close(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def default_callbacks(config: TrainConfig, preview: PreviewFunction | None = None) -> list[Callback]:
    """What a run reports unless told otherwise: metrics, the bar (``config.progress``), the
    console, a preview sample (when ``preview`` is given), the plot (``config.plot``), and
    TensorBoard event files (``config.log == "tensorboard"``).

    Order matters at the end: the plot is drawn before the console names it.
    """
    callbacks: list[Callback] = [MetricsLog()]
    if config.log == "tensorboard":
        callbacks.append(TensorBoardLog(preview))
    if config.progress:
        callbacks.append(ProgressBar())  # first to end, so that the bar is gone before the last lines
    if config.plot:
        callbacks.append(PlotAtEnd())
    callbacks.append(ConsoleReport())
    if preview is not None:
        callbacks.append(PreviewText(preview))
    return callbacks


def trigger(callbacks: Sequence[Callback], hook: str, *args: Any) -> None:
    """Call ``hook`` on every callback, in order."""
    for callback in callbacks:
        getattr(callback, hook)(*args)

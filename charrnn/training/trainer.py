"""The training loop: truncated BPTT over stateful batch streams, with exact resume.

One step reads the next ``seq_len`` characters of every stream, runs them from the
hidden state the previous step left (detached: truncated backpropagation through
time), clips the global gradient norm and takes an AdamW step under a warm-up +
cosine schedule. Every ``eval_interval`` steps it measures the loss on the whole
validation split, saves ``last`` (everything a resume needs) and, if the loss
improved, ``best`` (what sampling needs).
"""

from __future__ import annotations

import gc
import math
import signal
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import Checkpoint, claim_run_dir, load_checkpoint, save_checkpoint
from ..config import ModelConfig, TrainConfig
from ..data.corpus import corpus_name
from ..data.splits import read_run_data, unknown_count
from ..data.streams import BatchStreams, StreamPosition
from ..device import autocast, resolve_device, resolve_dtype
from ..errors import CharRNNError, CheckpointError, CorpusError, PeerLostError, TrainingError
from ..evaluation import evaluate
from ..model import CharRNN, State, count_parameters, load_grown
from .callbacks import Callback, PreviewFunction, default_callbacks, trigger
from .distributed import Distributed, peer_lost
from .resume import TrainingState, explicit_fields, fine_tune_model_config, merge_resume_config, resume_after_restart, warn
from .schedule import budget_progress, learning_rate, make_optimizer
from .signals import SIGNAL_AGREE_SECONDS, StopSignal
from .sizing import plan_run


@dataclass
class TrainResult:
    """Where a finished (or stopped) run left its checkpoints, and how it ended."""

    run_dir: Path
    step: int
    best_val_loss: float
    stop_reason: str
    signal: int | None = None
    plot: Path | None = None  # the loss curves, when a callback drew them

    @property
    def best(self) -> Path:
        return self.run_dir / "best"

    @property
    def last(self) -> Path:
        return self.run_dir / "last"


# --- the trainer -------------------------------------------------------------------------------


class Trainer:
    """Holds one run's state; :meth:`run` trains until a budget, a signal or early stopping."""

    def __init__(
        self,
        config: TrainConfig,
        model_config: ModelConfig | None = None,
        explicit: set[str] | None = None,
        callbacks: Sequence[Callback] | None = None,
        preview: PreviewFunction | None = None,
    ):
        self.dist = Distributed.from_env()
        notes: list[str] = []
        config, model_config, saved, base = self._starting_point(config, model_config or ModelConfig(), explicit, notes)
        # The default set follows the settings the run goes on with (a resumed run's, once merged).
        callbacks = default_callbacks(config, preview) if callbacks is None else list(callbacks)
        self.callbacks = callbacks if self.dist.is_main else []  # only the main process reports
        for note in notes:
            self.message(note)
        self.config = config
        self.device = self.dist.start(resolve_device(config.device))
        # A resumed run keeps the precision its probe chose (auto measured it once, at the start).
        saved_dtype = saved.meta.get("dtype") if saved else None
        resumed_auto = config.dtype == "auto" and saved_dtype in ("float32", "bfloat16")
        self.dtype = resolve_dtype(saved_dtype if resumed_auto else config.dtype, self.device)
        self._check_same_resume(saved)
        # What a restart records in metrics.jsonl: which attempt this is, and the save it resumed from.
        self.restart, self.resumed_from = self.dist.restart, (saved.path if saved else None)
        self._read_corpus(saved, base)
        # Settings left at auto are chosen from the budget (a resumed run has none left).
        self.plan = plan_run(
            config,
            replace(model_config, vocab_size=self.tokenizer.vocab_size),
            len(self.train_tokens),
            self.device,
            self.dtype,
            share=lambda v: self.dist.sum([v if self.dist.is_main else 0.0], self.device)[0],
        )
        self.config, model_config, self.dtype = self.plan.config, self.plan.model, self.plan.dtype
        self.streams = self._batch_streams()
        self._build_model(model_config, base)
        self.optimizer = make_optimizer(self.model, self.config)
        self.saved_step = -1
        self.last_save = time.monotonic()  # when rank 0 last wrote `last` (reset when training starts)

        self.step = 0
        self.position = StreamPosition()
        self.hidden: State | None = None  # carried across batches; None: zeros
        self._stop_signal: StopSignal | None = None  # while run() runs
        self.elapsed = self.plan.probe_seconds  # the probe of this machine counts in --max-time
        self.best_val = math.inf
        self.evals_without_improvement = 0
        self.run_dir = Path(self.config.out) if self.config.out else self._default_run_dir(saved)
        self.training_state = TrainingState(self)
        if saved:
            self.training_state.restore(saved)
        self.chars_per_step = self.streams.batch_size * self.config.seq_len

    def _starting_point(
        self, config: TrainConfig, model_config: ModelConfig, explicit: set[str] | None, notes: list[str]
    ) -> tuple[TrainConfig, ModelConfig, Checkpoint | None, Checkpoint | None]:
        """The settings the run goes on with, the save it resumes (if any) and the model it fine-tunes (if any)."""
        saved, base = None, None
        # A worker group that torchrun restarted goes on from the run's last save by itself.
        config, restart_note = resume_after_restart(config, self.dist)
        notes += [restart_note] if restart_note else []
        if explicit is None:
            explicit = explicit_fields(config, model_config)
        self.init_source = None
        if config.resume:
            saved = load_checkpoint(config.resume, with_training_state=True)
            config, model_config = merge_resume_config(config, model_config, saved, explicit, notes.append)
            self.init_source = saved.meta.get("init_from")
        elif config.init_from:
            # Fine-tuning: the trained model's weights and vocabulary, everything else new.
            base = load_checkpoint(config.init_from)
            model_config = fine_tune_model_config(model_config, base, explicit)
            self.init_source = config.init_from
        return config, model_config, saved, base

    def _read_corpus(self, saved: Checkpoint | None, base: Checkpoint | None) -> None:
        """Tokenize the corpus (with the saved or fine-tuned vocabulary) and split it into train and val."""
        config = self.config
        # Rank 0 encodes the corpus into its token cache; the others then map the same file.
        for turn in (True, False):
            if self.dist.is_main == turn:
                run_data = read_run_data(
                    config.sources,
                    config.hf_split,
                    config.hf_column,
                    config.val_data,
                    config.mix,
                    tokenizer=saved.tokenizer if saved else (base.tokenizer if base and config.new_chars == "unk" else None),
                    max_vocab=config.max_vocab,
                    grow_from=base.tokenizer if base and config.new_chars == "grow" else None,
                )
            self.dist.barrier()
        self.tokenizer, self.data_record = run_data.tokenizer, run_data.record
        if self.dist.is_main:
            for note in (*run_data.notes, *(self._vocabulary_notes(base, run_data.corpus_tokens) if base else ())):
                self.message(note)
        self.train_tokens, self.val_tokens, self.val_parts = run_data.train, run_data.val, run_data.val_parts
        self.validates = run_data.validates
        self.val_by_corpus: dict[str, float] = {}  # each corpus's loss at the last evaluation, when several validate
        if len(self.val_tokens) < 2:
            raise CorpusError(f"corpus {config.data!r} is too short for a validation split: it needs at least 20 characters")

    def _batch_streams(self) -> BatchStreams:
        """This process's rows of the training layout.

        Under DDP the layout has batch_size x world rows and each process reads its own block,
        so N processes x batch B see exactly the batches of one process x batch N*B.
        """
        bs, rank, config = self.config.batch_size, self.dist.rank, self.config
        try:
            return BatchStreams(
                self.train_tokens, bs * self.dist.world_size, config.seq_len, config.seed, rows=slice(rank * bs, (rank + 1) * bs)
            )
        except CorpusError as exc:
            raise CorpusError(f"corpus {config.data!r}: {exc}") from None

    def _build_model(self, model_config: ModelConfig, base: Checkpoint | None) -> None:
        """The model (grown from ``base`` when fine-tuning) and, under DDP, its wrapper that trains."""
        torch.manual_seed(self.config.seed)
        self.model_config = ModelConfig(**{**model_config.to_dict(), "vocab_size": self.tokenizer.vocab_size})
        self.model = CharRNN(self.model_config).to(self.device)
        if base is not None:
            load_grown(self.model, base.model.to(self.device))
        if self.dist.rank:
            torch.manual_seed(self.config.seed + self.dist.rank)  # each process its own dropout masks
        # The model that trains: DDP averages the gradients over the processes.
        self.train_model = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.enabled
            else self.model
        )

    def _check_same_resume(self, saved: Checkpoint | None) -> None:
        """Every process must resume from the same save (or none): each read the run folder for itself.

        Where the folder is on one machine's disk only, the other machines' processes would
        find no save (or an older copy) and train on from somewhere else.
        """
        if not self.dist.enabled:
            return
        step = int(saved.state["step"]) if saved and saved.state else -1
        steps = [int(t) for t in self.dist.gather(torch.tensor([step], dtype=torch.int64, device=self.device))]
        if len(set(steps)) > 1:
            found = ", ".join(f"rank {r}: {'none' if s < 0 else f'step {s}'}" for r, s in enumerate(steps))
            raise CheckpointError(
                f"the processes found different saves to resume from ({found}): every machine must see the same "
                f"run folder ({saved.path.parent if saved else self.config.out}); put it on shared storage, or copy it "
                "to the same path on each machine"
            )

    def _vocabulary_notes(self, base: Checkpoint, tokens: Any) -> list[str]:
        """What a fine-tuned run does with the new corpus's characters, for the user."""
        old = base.tokenizer.vocab_size
        if self.config.new_chars == "grow":
            added = self.tokenizer.chars[old:]
            if not added:
                return []
            return [
                f"note: the vocabulary grows from {old} to {self.tokenizer.vocab_size} characters for "
                f"{''.join(added[:20])!r}{' ...' if len(added) > 20 else ''}, with new embedding and output rows "
                "(--new-chars unk reads them as <unk> instead)"
            ]
        unknown = unknown_count(tokens)
        if not unknown:
            return []
        return [
            f"note: {unknown:,} characters of the corpus ({unknown / max(len(tokens), 1):.2%}) are not in the model's "
            "vocabulary and read as <unk> (--new-chars unk); --new-chars grow gives them rows of their own"
        ]

    def _default_run_dir(self, saved: Checkpoint | None) -> Path:
        if saved is not None:
            return saved.path.parent
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path("checkpoints") / f"{'+'.join(map(corpus_name, self.config.sources))}-{stamp}"

    # -- reporting ----------------------------------------------------------------------------------
    def message(self, text: str) -> None:
        """A warning or note for the user, handed to the callbacks."""
        trigger(self.callbacks, "on_message", self, text)

    def _report_signals(self) -> None:
        """Hand the signals that came since the last report to the callbacks (``on_signal``)."""
        if self._stop_signal is not None:
            for signum, repeated in self._stop_signal.unreported():
                trigger(self.callbacks, "on_signal", self, signum, repeated)

    def describe(self) -> str:
        """One line on what trains: model, data, device, processes, run directory."""
        m = self.model_config
        return (
            f"charrnn: {m.cell} {m.n_layers}x{m.hidden_size}, {count_parameters(self.model):,} parameters, "
            f"vocab {self.tokenizer.vocab_size}, {len(self.train_tokens):,} train / {len(self.val_tokens):,} val chars "
            f"({self.validates} validates), "
            f"{self.device.type} {str(self.dtype).replace('torch.', '')}"
            f"{f', {self.dist.world_size} processes' if self.dist.enabled else ''}; run dir {self.run_dir}"
        )

    def progress(self) -> float:
        """How far the run is through its budget, 0 -> 1."""
        return budget_progress(self.config, self.step, self.elapsed)

    # -- evaluation and saving ------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "train": asdict(self.config),
            "step": self.step,
            "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
            "dtype": str(self.dtype).replace("torch.", ""),
            # Which torchrun job saved it: a restart resumes only from its own job's saves.
            **({"torchrun_job": self.dist.run_id} if self.dist.elastic else {}),
            "elapsed": round(self.elapsed, 3),  # seconds of training steps so far (a model card reports it)
            "init_from": self.init_source,
            "data": self.data_record,  # what trained and what validated, with sizes and sha256s
        }

    def checkpoint(self) -> None:
        """Evaluate on the whole validation split and save ``last`` (and ``best`` if it improved).

        Under DDP every process calls this (the state is gathered from all of them), and
        rank 0 alone evaluates, logs and writes.
        """
        tensors, state = self.training_state.capture()
        self.saved_step = self.step
        if not self.dist.is_main:
            return
        val = self._evaluate()
        improved = val < self.best_val
        if improved:
            self.best_val = val
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        state["best_val_loss"] = self.best_val if math.isfinite(self.best_val) else None
        state["evals_without_improvement"] = self.evals_without_improvement
        self._report_signals()
        trigger(self.callbacks, "on_evaluation", self, val, improved)
        if improved:
            save_checkpoint(self.run_dir / "best", self.model, self.tokenizer, self._meta())
        save_checkpoint(self.run_dir / "last", self.model, self.tokenizer, self._meta(), tensors, state)
        self.last_save = time.monotonic()
        self._report_signals()
        trigger(self.callbacks, "on_checkpoint", self, val, improved)

    def _evaluate(self) -> float:
        """The validation loss; with several corpora validating, each one's (kept in ``val_by_corpus``),
        and their mean weighted by size: the mean over every validation character."""
        if not self.val_parts:
            return evaluate(self.model, self.val_tokens, self.device, self.dtype)
        self.val_by_corpus = {name: evaluate(self.model, tokens, self.device, self.dtype) for name, tokens in self.val_parts}
        weights = [len(tokens) - 1 for _, tokens in self.val_parts]
        return sum(w * loss for w, loss in zip(weights, self.val_by_corpus.values())) / sum(weights)

    def save(self) -> None:
        """Save ``last`` without evaluating (``--save-every``): what a crash or a restart goes on from.

        Under DDP every process calls this (the state is gathered); rank 0 writes.
        """
        tensors, state = self.training_state.capture()
        if self.dist.is_main:
            save_checkpoint(self.run_dir / "last", self.model, self.tokenizer, self._meta(), tensors, state)
            self.last_save = time.monotonic()
            self._report_signals()

    # -- the loop -------------------------------------------------------------------------------------
    def _budget_done(self) -> str | None:
        c = self.config
        if c.max_iters and self.step >= c.max_iters:
            return f"reached --max-iters {c.max_iters}"
        if c.max_time and self.elapsed >= c.max_time:
            return f"reached --max-time {c.max_time:g} s"
        if c.patience and self.evals_without_improvement >= c.patience:
            # Early stopping is the last line of defence here: say what would have helped instead.
            return (  # read on by " at step N; best val ..."
                f"no improvement in {c.patience} evaluations (--patience: the model began to memorise its corpus; "
                "more text, a smaller --hidden-size or more --dropout / --weight-drop help, more time does not), "
                "so it stopped"
            )
        return None

    def train_step(self) -> float:
        """One optimisation step on the next batch; returns the loss (nats/char)."""
        if self.position.index == 0:
            self.hidden = None  # each epoch's layout starts fresh
        x, y = self.streams.get(self.position)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        lr = learning_rate(self.config, self.step, budget_progress(self.config, self.step, self.elapsed))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.device, self.dtype):
            logits, hidden = self.train_model(x, self.hidden)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        # The mean over all processes: what one process with the global batch would log,
        # and the same verdict on a non-finite loss everywhere.
        loss_value = self.dist.sum([loss.item()], self.device)[0] / self.dist.world_size
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"the loss became {loss_value} at step {self.step + 1}: training stopped before the bad step "
                f"touched the weights. Lower --lr (now {self.config.lr:g}) or --grad-clip, then resume from "
                f"{self.run_dir / 'last'}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss.backward()  # under DDP this exchanges the gradients
        except RuntimeError as exc:
            if self.dist.enabled and not isinstance(exc, torch.OutOfMemoryError):
                raise peer_lost("exchanging gradients", exc) from None
            raise
        # Without clipping (--grad-clip 0) the norm is still measured, so that a non-finite
        # gradient stops the run here rather than turning the weights into NaN.
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip or math.inf)
        if not torch.isfinite(norm):
            raise TrainingError(
                f"the gradient became non-finite at step {self.step + 1}: training stopped before it touched "
                f"the weights. Lower --lr, then resume from {self.run_dir / 'last'}"
            )
        self.optimizer.step()
        self.hidden = hidden.detach()  # truncated BPTT: the values carry on, the graph stops here
        self.step += 1
        self.position = self.streams.next(self.position)
        return loss_value

    def _should_stop(self, stop_signal: StopSignal) -> tuple[str | None, bool]:
        """Why the run ends before the next step, if it does, and whether a ``--save-every`` save is due.

        Every process gets the same answers (in one collective).
        """
        self._report_signals()
        main = self.dist.is_main
        reason = self._budget_done() if main else None
        every = self.config.save_every
        save_due = main and every > 0 and time.monotonic() - self.last_save >= every
        signalled = stop_signal.signum is not None
        if self.dist.enabled:
            # Rank 0's clock and verdicts rule, so every process takes the same steps at the same rates.
            ended, signals, elapsed, due = self.dist.sum(
                [float(reason is not None), float(signalled), self.elapsed if main else 0.0, float(save_due)],
                self.device,
                timeout=SIGNAL_AGREE_SECONDS if signalled else None,
            )
            self.elapsed, signalled, save_due = elapsed, signals > 0, due > 0
            reason = reason or ("ended by rank 0" if ended else None)
        if reason is None and signalled:
            name = signal.Signals(stop_signal.signum).name if stop_signal.signum else "a signal to another process"
            reason = f"stopped by {name}"
        return reason, save_due

    def run(self) -> TrainResult:
        """Train until a budget, a signal or early stopping ends the run; save and report."""
        # A resumed run (or a torchrun restart, whose first attempt may have logged before any save) goes on in its folder.
        saved_here = self.resumed_from is not None and self.resumed_from.resolve().parent == self.run_dir.resolve()
        resuming = saved_here or self.restart > 0
        with claim_run_dir(self.run_dir, resuming) if self.dist.is_main else nullcontext():
            self.model.train()
            self.last_save = time.monotonic()  # --save-every counts from the start of training
            stop_signal = self._stop_signal = StopSignal()
            try:
                result = self._loop(stop_signal)
            finally:
                trigger(self.callbacks, "on_close", self)
            self.dist.barrier()  # nobody leaves while rank 0 still writes
        return result

    def _loop(self, stop_signal: StopSignal) -> TrainResult:
        c, reason = self.config, None
        trigger(self.callbacks, "on_start", self)
        with stop_signal.installed():
            while reason is None:
                reason, save_due = self._should_stop(stop_signal)
                if reason:
                    break
                if save_due:
                    self.save()
                # --max-time counts training steps only: evaluations and saves come on top.
                start = time.perf_counter()
                loss = self.train_step()
                self.elapsed += time.perf_counter() - start
                trigger(self.callbacks, "on_step", self, loss)
                if self.step % c.eval_interval == 0:
                    self.checkpoint()
            # The last evaluation and save, still under the handler: a second Ctrl-C cannot cut them short.
            if self.saved_step != self.step:
                self.checkpoint()
            self._report_signals()  # any that came after the last report, before the last lines
        result = TrainResult(self.run_dir, self.step, self.best_val, reason, stop_signal.signum)
        trigger(self.callbacks, "on_end", self, result)
        return result


def train(
    config: TrainConfig,
    model_config: ModelConfig | None = None,
    explicit: set[str] | None = None,
    callbacks: Sequence[Callback] | None = None,
    preview: PreviewFunction | None = None,
) -> TrainResult:
    """Train a CharRNN as ``config`` says and return where its checkpoints are.

    ``callbacks`` report the run (default: :func:`~charrnn.training.callbacks.default_callbacks`
    of the run's settings, with ``preview`` making its sample text).
    Under ``torchrun`` every process calls this; they train together with DDP.
    """
    dist = Distributed.from_env()
    trainer = None
    try:
        trainer = Trainer(config, model_config, explicit, callbacks, preview)
        return trainer.run()
    except CharRNNError as exc:
        # A user's mistake (a corpus gone, a bad flag, a full disk) meets every restart again:
        # end the torchrun job with its message rather than restart it --max-restarts times.
        # A lost peer is the failure restarts are for.
        if not isinstance(exc, PeerLostError) and dist.end_restarts():
            warn("warning: ended the torchrun job instead of restarting it: a restart would meet the error below again")
        raise
    finally:
        # The DDP wrapper (its reducer holds the gloo backend and tensors with Python references) is
        # freed here, reference cycles too, while the interpreter is whole: left to the end of the
        # process, gloo's threads released those tensors during finalization and aborted rank 0 (SIGABRT).
        del trainer
        gc.collect()
        dist.stop()

"""Resuming a run: the settings it goes on with, torchrun restarts, and the exact-resume state.

A resumed run equals an unbroken one bit for bit: :class:`TrainingState` writes into
``last`` everything the next step depends on (optimizer moments, every process's RNG,
the hidden state of every stream, the counters and the place in the batch streams) and
puts it back.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._io import read_json
from ..checkpoint import Checkpoint, resolve_checkpoint
from ..config import REGULARISATION, ModelConfig, TrainConfig
from ..data.streams import StreamPosition
from ..errors import CheckpointError, ConfigError
from ..model import CELL_TABLE, State
from .distributed import Distributed

if TYPE_CHECKING:
    from .trainer import Trainer

# Settings that may change when a run resumes (with a warning for the ones that matter).
_QUIET_ON_RESUME = {"resume", "out", "device", "progress", "plot", "log", "init_from", "new_chars", "save_every"}
_SHAPE_FIELDS = {"cell", "n_layers", "hidden_size", "embedding_size"}


def merge_resume_config(
    config: TrainConfig,
    model_config: ModelConfig,
    saved: Checkpoint,
    explicit: set[str],
    notify: Callable[[str], None] | None = None,
) -> tuple[TrainConfig, ModelConfig]:
    """The settings a resumed run uses: the checkpoint's, with what the user set explicitly.

    A different model shape is an error (the weights would not fit); other changed
    settings are allowed with a warning, handed to ``notify`` (default: ``warnings.warn``).
    """
    saved_train = saved.meta.get("train", {})
    saved_model = saved.meta["model"]
    # "auto" (None) on resume means: keep what the run chose.
    explicit = {n for n in explicit if getattr(model_config if n in saved_model else config, n, None) is not None}
    try:  # config.json carries no checksum of its own: check its training settings before using them
        if not isinstance(saved_train, dict):
            raise ConfigError(f"'train' is a {type(saved_train).__name__}, not an object")
        checked = TrainConfig(**{f.name: saved_train[f.name] for f in fields(TrainConfig) if f.name in saved_train})
        # A saved run's settings were all chosen before it trained: an auto (None) one is damage.
        unset = [f.name for f in fields(TrainConfig) if f.metadata.get("auto") and saved_train.get(f.name, 0) is None]
        if unset:
            raise ConfigError(f"{', '.join(unset)} missing")
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(
            f"{saved.path / 'config.json'} holds invalid training settings ({exc}): the checkpoint is damaged; "
            "resume from another one"
        ) from None
    for name in sorted(explicit & _SHAPE_FIELDS):
        if getattr(model_config, name) != saved_model.get(name):
            raise ConfigError(
                f"--{name.replace('_', '-')} {getattr(model_config, name)} does not fit the checkpoint, whose model "
                f"has {saved_model.get(name)}: a resumed run keeps its model shape; drop the flag or start a new run"
            )
    # As the checked TrainConfig holds them (JSON gave lists where it keeps tuples: several corpora, a mix).
    train_values = {f.name: getattr(checked if f.name in saved_train else config, f.name) for f in fields(TrainConfig)}
    model_values = dict(saved_model)
    for name in sorted(explicit):
        target = model_values if name in model_values else train_values
        new = getattr(model_config, name) if target is model_values else getattr(config, name)
        if name not in _QUIET_ON_RESUME and target.get(name) != new:
            (notify or warn)(f"warning: resuming with {name}={new!r}; the run was trained with {target.get(name)!r}")
        target[name] = new
    train_values["resume"] = config.resume
    train_values["init_from"] = None  # a fine-tuned run took its start weights once; resuming goes on from its own
    if "out" not in explicit:  # the run goes on where its checkpoint is, even if it was moved since
        train_values["out"] = str(saved.path.parent)
    return TrainConfig(**train_values), ModelConfig(**model_values)


def fine_tune_model_config(model_config: ModelConfig, base: Checkpoint, explicit: set[str]) -> ModelConfig:
    """The model of a run fine-tuned from ``base``: its shape, with the dropout rates the user chose (or auto).

    A shape flag the user set to another value than the checkpoint's is a ``ConfigError``:
    the trained weights would not fit it.
    """
    saved = base.model.config
    for name in sorted(explicit & _SHAPE_FIELDS):
        value = getattr(model_config, name)
        if value is not None and value != getattr(saved, name):
            raise ConfigError(
                f"--{name.replace('_', '-')} {value} contradicts --init-from {base.path}, whose model has "
                f"{getattr(saved, name)}: a fine-tuned run keeps the trained model's shape; drop the flag"
            )
    return replace(saved, **{name: getattr(model_config, name) for name in REGULARISATION})


def warn(text: str) -> None:
    """Issue a ``warning: ...`` line as a Python warning (what a library caller sees without callbacks)."""
    warnings.warn(text.removeprefix("warning: "), stacklevel=3)


def explicit_fields(config: TrainConfig, model_config: ModelConfig) -> set[str]:
    """Fields that differ from their defaults: what a library caller evidently chose."""
    return {f.name for f in fields(TrainConfig) if getattr(config, f.name) != f.default} | {
        f.name for f in fields(ModelConfig) if f.name != "vocab_size" and getattr(model_config, f.name) != f.default
    }


def resume_after_restart(config: TrainConfig, dist: Distributed) -> tuple[TrainConfig, str | None]:
    """Where a worker group that torchrun restarted goes on from: its run's ``last``, if saved.

    The first attempt is left as it was given. A restarted one (``TORCHELASTIC_RESTART_COUNT``
    > 0) resumes from the ``last`` of the run directory, ``--out`` or else the folder of
    ``--resume``; with no save there yet it starts as the first attempt did. Returns the
    settings to go on with and a note for the user.
    """
    if not dist.restart:
        return config, None
    attempt = f"torchrun restart {dist.restart} of at most {dist.max_restarts}"
    run_dir = Path(config.out) if config.out else None
    if run_dir is None and config.resume:
        try:
            run_dir = resolve_checkpoint(config.resume, ("last",)).parent
        except CheckpointError:
            run_dir = None
    if run_dir is None:
        return config, (
            f"warning: {attempt}, but no --out names the run, so its saves cannot be found: it starts over "
            "in a new folder; give --out RUN to let a restart continue from RUN/last"
        )
    start = f"from {config.resume}" if config.resume else "from step 0"
    try:
        last = resolve_checkpoint(run_dir / "last")
        job = read_json(last / "config.json").get("torchrun_job")
        resumed = resolve_checkpoint(config.resume, ("last",)) if config.resume else None
    except (CheckpointError, OSError, ValueError, AttributeError):
        return config, f"note: {attempt}: {run_dir} holds no save yet, so training starts again {start}"
    # A `last` an earlier job left in the folder (this job's first attempt died before its first
    # save) is not this run's, unless this job started from it.
    if job != dist.run_id and (resumed is None or last.resolve() != resumed.resolve()):
        return config, f"note: {attempt}: {last} was saved by another job, so training starts again {start}"
    # A fine-tuning run resumes from its own save too: --init-from only shaped its first attempt.
    resumed_config = replace(config, resume=str(last), init_from=None)
    return resumed_config, f"note: {attempt}: resuming from {last}, the run's last save"


def _check_training_state(state: dict[str, Any]) -> None:
    """Range- and type-check the saved counters before use (``ValueError``/``KeyError`` naming the bad one).

    A checksum recorded in the unchecked config.json proves nothing, so the values are checked too.
    """
    for name in ("step", "epoch", "index", "evals_without_improvement", "hidden_parts"):
        value = state[name]
        if type(value) is not int or value < 0:
            raise ValueError(f"{name} = {value!r} is not a count")
    if state["hidden_parts"] > 2:
        raise ValueError(f"hidden_parts = {state['hidden_parts']} (an LSTM has 2)")
    elapsed, best = state["elapsed"], state["best_val_loss"]
    if not isinstance(elapsed, (int, float)) or isinstance(elapsed, bool) or not 0 <= elapsed < math.inf:
        raise ValueError(f"elapsed = {elapsed!r} is not a time")
    if best is not None and (not isinstance(best, (int, float)) or isinstance(best, bool) or not 0 <= best < math.inf):
        raise ValueError(f"best_val_loss = {best!r} is not a loss")
    if not isinstance(state["param_groups"], list):
        raise ValueError("param_groups is not a list")


class TrainingState:
    """A run's exact-resume state: :meth:`capture` gathers it for a save, :meth:`restore` puts it back."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def capture(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything an exact resume needs. Under DDP every process must call it (it gathers)."""
        t = self.trainer
        opt = t.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        # Each process's dropout RNG; the collective runs on the device (nccl wants CUDA tensors).
        for rank, rng in enumerate(t.dist.gather(torch.get_rng_state().to(t.device))):
            tensors["rng.cpu" if rank == 0 else f"rng.cpu.{rank}"] = rng.cpu()
        if t.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(t.device)
        for index, values in opt["state"].items():
            for key, value in values.items():
                tensors[f"optim.{index}.{key}"] = value
        if t.hidden is not None:
            # The whole layout's state, rows in rank order: any process count can pick up its rows.
            for i, h in enumerate(t.hidden.tensors()):  # hidden.0 = h, hidden.1 = c (LSTM)
                tensors[f"hidden.{i}"] = t.dist.gather_rows(h)
        state = {
            "step": t.step,
            "epoch": t.position.epoch,
            "index": t.position.index,
            "elapsed": t.elapsed,
            "best_val_loss": t.best_val if math.isfinite(t.best_val) else None,
            "evals_without_improvement": t.evals_without_improvement,
            "param_groups": opt["param_groups"],
            "hidden_parts": 0 if t.hidden is None else len(t.hidden.tensors()),
            "world_size": t.dist.world_size,
        }
        return tensors, state

    def restore(self, saved: Checkpoint) -> None:
        """Put the run where ``saved`` left it: weights, optimizer, RNGs, hidden state, counters, stream place.

        Raises ``CheckpointError`` when the saved state does not fit this run.
        """
        self._restore(saved)
        self._fit_position_to_layout(saved)

    def _restore(self, saved: Checkpoint) -> None:
        t = self.trainer
        state, tensors = saved.state, saved.state_tensors
        try:
            _check_training_state(state)
            t.model.load_state_dict(saved.model.state_dict())
            optim_state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                if key.startswith("optim."):
                    _, index, name = key.split(".", 2)
                    optim_state.setdefault(int(index), {})[name] = value
            t.optimizer.load_state_dict({"state": optim_state, "param_groups": state["param_groups"]})
            rank = t.dist.rank
            rng = tensors.get("rng.cpu" if rank == 0 else f"rng.cpu.{rank}")
            if rng is not None:  # a process the saved run did not have keeps its fresh seed
                torch.set_rng_state(rng)
            if "rng.cuda" in tensors and t.device.type == "cuda":
                torch.cuda.set_rng_state(tensors["rng.cuda"], t.device)
            parts = [tensors[f"hidden.{i}"].to(t.device) for i in range(state["hidden_parts"])]
            layers, width = t.model_config.n_layers, t.model_config.hidden_size
            expected = len(CELL_TABLE[t.model_config.cell].state_names)
            if any(p.dim() != 3 or (p.size(0), p.size(2)) != (layers, width) or not p.is_floating_point() for p in parts) or (
                parts and len(parts) != expected
            ):
                raise ValueError(f"saved hidden state does not fit a {layers}x{width} {t.model_config.cell} model")
            t.hidden = State.from_tensors(parts) if parts else None
            if t.hidden is not None and t.hidden.streams == t.streams.batch_size:  # same global layout
                t.hidden = t.hidden.select(t.streams.rows)
            t.step = int(state["step"])
            t.position = StreamPosition(int(state["epoch"]), int(state["index"]))
            t.elapsed = float(state["elapsed"])
            best = state["best_val_loss"]
            t.best_val = math.inf if best is None else float(best)
            t.evals_without_improvement = int(state["evals_without_improvement"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{saved.path} holds training state this run cannot use ({exc})") from None

    def _fit_position_to_layout(self, saved: Checkpoint) -> None:
        """A resumed run whose batches are laid out differently starts the next epoch afresh.

        The saved stream position and hidden state belong to the saved layout: with another
        --batch-size or --seq-len (or a shorter corpus) they point at other text, or past its end.
        """
        t = self.trainer
        saved_train = saved.meta.get("train", {})
        # The layout depends on the global batch: 2 processes x 4 rows resume as 1 x 8 exactly.
        saved_global = saved_train.get("batch_size", 0) * saved.state.get("world_size", 1)
        changed = []
        if saved_global != t.streams.batch_size:
            changed.append(
                "--batch-size"
                if t.dist.world_size == saved.state.get("world_size", 1)
                else "the global batch (--batch-size x processes)"
            )
        if saved_train.get("seq_len") != t.config.seq_len:
            changed.append("--seq-len")
        pos = t.position
        if (changed and pos.index > 0) or pos.index >= t.streams.batches_in_epoch(pos.epoch):
            t.position, t.hidden = StreamPosition(pos.epoch + 1, 0), None
            why = f"{' and '.join(changed)} changed" if changed else "the corpus is shorter than it was"
            t.message(
                f"note: {why}, so the saved place in the batch streams no longer applies; training goes on "
                f"from the start of epoch {t.position.epoch}"
            )
        elif changed:
            t.hidden = None

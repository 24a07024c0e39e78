"""The training loop: truncated BPTT over stateful batch streams, with exact resume.

One step reads the next ``seq_len`` characters of every stream, runs them from the
hidden state the previous step left (detached: truncated backpropagation through
time), clips the global gradient norm and takes an AdamW step under a warm-up +
cosine schedule. Every ``eval_interval`` steps it measures the loss on the whole
validation split, saves ``last`` (everything a resume needs) and, if the loss
improved, ``best`` (what sampling needs).
"""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .._io import FolderBusyError, folder_lock, read_json
from ..checkpoint import Checkpoint, check_replaceable, load_checkpoint, resolve_checkpoint, save_checkpoint
from ..config import ModelConfig, TrainConfig
from ..data.corpus import corpus_name
from ..data.streams import BatchStreams, StreamPosition, split_tokens
from ..data.token_cache import corpus_tokens
from ..device import autocast, resolve_device, resolve_dtype
from ..errors import CharRNNError, CheckpointError, ConfigError, CorpusError, PeerLostError, TrainingError
from ..evaluation import evaluate
from ..model import CELL_TABLE, CharRNN, State, count_parameters, load_grown
from .callbacks import Callback, PreviewFunction, default_callbacks, trigger
from .distributed import Distributed, peer_lost
from .sizing import plan_run

# Settings that may change when a run resumes (with a warning for the ones that matter).
_QUIET_ON_RESUME = {"resume", "out", "device", "progress", "plot", "log", "init_from", "new_chars", "save_every"}
_SHAPE_FIELDS = {"cell", "n_layers", "hidden_size", "embedding_size"}
# After a signal, how long the processes wait for each other to agree to stop and save. torchrun
# SIGTERMs every worker when one dies, and kills them 30 s later: a dead or hung peer must not
# hold the survivors in a collective until then (or for the process group's 30 minutes).
SIGNAL_AGREE_SECONDS = 10.0


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


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` as ``progress`` goes 0 -> 1."""
    if step < config.warmup_iters:
        return config.lr * (step + 1) / config.warmup_iters
    p = min(max(progress, 0.0), 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * p))


def budget_progress(config: TrainConfig, step: int, elapsed: float) -> float:
    """How far the run is through its schedule, 0 -> 1 (steps or time, whichever is further)."""
    if config.lr_decay_iters:
        return step / config.lr_decay_iters
    by_steps = step / config.max_iters if config.max_iters else 0.0
    by_time = elapsed / config.max_time if config.max_time else 0.0
    return max(by_steps, by_time)


def make_optimizer(model: CharRNN, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not on biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99))


# --- resuming ------------------------------------------------------------------------------


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
        TrainConfig(**{f.name: saved_train[f.name] for f in fields(TrainConfig) if f.name in saved_train})
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
    train_values = {f.name: saved_train.get(f.name, getattr(config, f.name)) for f in fields(TrainConfig)}
    model_values = dict(saved_model)
    for name in sorted(explicit):
        target = model_values if name in model_values else train_values
        new = getattr(model_config, name) if target is model_values else getattr(config, name)
        if name not in _QUIET_ON_RESUME and target.get(name) != new:
            (notify or _warn)(f"warning: resuming with {name}={new!r}; the run was trained with {target.get(name)!r}")
        target[name] = new
    train_values["resume"] = config.resume
    train_values["init_from"] = None  # a fine-tuned run took its start weights once; resuming goes on from its own
    if "out" not in explicit:  # the run goes on where its checkpoint is, even if it was moved since
        train_values["out"] = str(saved.path.parent)
    return TrainConfig(**train_values), ModelConfig(**model_values)


def fine_tune_model_config(model_config: ModelConfig, base: Checkpoint, explicit: set[str]) -> ModelConfig:
    """The model of a run fine-tuned from ``base``: its shape, with the dropout the user chose (or auto).

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
    return replace(saved, dropout=model_config.dropout)


def _unknown_count(tokens: Any) -> int:
    """How many tokens are ``<unk>`` (id 0), counted a few MB at a time (the tokens may be a huge memory map)."""
    return sum(int((tokens[i : i + (1 << 24)] == 0).sum()) for i in range(0, len(tokens), 1 << 24))


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


def _warn(text: str) -> None:
    warnings.warn(text.removeprefix("warning: "), stacklevel=3)


def _explicit_fields(config: TrainConfig, model_config: ModelConfig) -> set[str]:
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


# --- signals ---------------------------------------------------------------------------------


class StopSignal:
    """Turns SIGINT / SIGTERM into a request to stop after the current step.

    The handler only records the signal. The trainer reports it through its callbacks
    (``on_signal``) at the next safe point (a step's end, an evaluation's, a save's):
    a handler runs between any two bytecodes, and one that printed could meet the
    terminal in the middle of another write. A signal after the first is reported and
    ignored, so the save always completes.
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal: it decides the exit status
        self.received: list[int] = []  # every signal, in order (the handler only appends)
        self._reported = 0

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        self.received.append(signum)

    def unreported(self) -> list[tuple[int, bool]]:
        """The signals received since the last call, each as (signum, repeated): ``repeated``
        for every one after the first, which changes nothing."""
        start = self._reported
        new = self.received[start:]  # a signal landing after this slice waits for the next call
        self._reported = start + len(new)
        return [(signum, start + i > 0) for i, signum in enumerate(new)]

    @contextmanager
    def installed(self) -> Iterator["StopSignal"]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals can only be handled in the main thread
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


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
        model_config = model_config or ModelConfig()
        self.dist = Distributed.from_env()
        saved, base, notes = None, None, []
        # A worker group that torchrun restarted goes on from the run's last save by itself.
        config, restart_note = resume_after_restart(config, self.dist)
        notes += [restart_note] if restart_note else []
        if explicit is None:
            explicit = _explicit_fields(config, model_config)
        if config.resume:
            saved = load_checkpoint(config.resume, with_training_state=True)
            config, model_config = merge_resume_config(config, model_config, saved, explicit, notes.append)
            self.init_source = saved.meta.get("init_from")
        elif config.init_from:
            # Fine-tuning: the trained model's weights and vocabulary, everything else new.
            base = load_checkpoint(config.init_from)
            model_config = fine_tune_model_config(model_config, base, explicit)
            self.init_source = config.init_from
        else:
            self.init_source = None
        # The default set follows the settings the run goes on with (a resumed run's, once merged).
        callbacks = default_callbacks(config, preview) if callbacks is None else list(callbacks)
        self.callbacks = callbacks if self.dist.is_main else []  # only the main process reports
        for note in notes:
            self.message(note)
        self.config = config
        self.device = self.dist.start(resolve_device(config.device))
        self.dtype = resolve_dtype(config.dtype, self.device)
        self._check_same_resume(saved)
        # What a restart records in metrics.jsonl: which attempt this is, and the save it resumed from.
        self.restart, self.resumed_from = self.dist.restart, (saved.path if saved else None)

        # Rank 0 encodes the corpus into its token cache; the others then map the same file.
        for turn in (True, False):
            if self.dist.is_main == turn:
                tokens, self.tokenizer = corpus_tokens(
                    config.data,
                    config.hf_split,
                    config.hf_column,
                    tokenizer=saved.tokenizer if saved else (base.tokenizer if base and config.new_chars == "unk" else None),
                    max_vocab=config.max_vocab,
                    grow_from=base.tokenizer if base and config.new_chars == "grow" else None,
                )
            self.dist.barrier()
        if base is not None and self.dist.is_main:
            for note in self._vocabulary_notes(base, tokens):
                self.message(note)
        self.train_tokens, self.val_tokens = split_tokens(tokens)
        if len(self.val_tokens) < 2:
            raise CorpusError(f"corpus {config.data!r} is too short for a validation split: it needs at least 20 characters")
        # Settings left at auto are chosen from the budget (a resumed run has none left).
        self.plan = plan_run(
            config,
            replace(model_config, vocab_size=self.tokenizer.vocab_size),
            len(self.train_tokens),
            self.device,
            self.dtype,
            share=lambda v: self.dist.sum([v if self.dist.is_main else 0.0], self.device)[0],
        )
        config, model_config = self.plan.config, self.plan.model
        self.config = config
        try:
            # Under DDP the layout has batch_size x world rows and each process reads its own block,
            # so N processes x batch B see exactly the batches of one process x batch N*B.
            bs, rank = config.batch_size, self.dist.rank
            self.streams = BatchStreams(
                self.train_tokens,
                bs * self.dist.world_size,
                config.seq_len,
                config.seed,
                rows=slice(rank * bs, (rank + 1) * bs),
            )
        except CorpusError as exc:
            raise CorpusError(f"corpus {config.data!r}: {exc}") from None

        torch.manual_seed(config.seed)
        self.model_config = ModelConfig(**{**model_config.to_dict(), "vocab_size": self.tokenizer.vocab_size})
        self.model = CharRNN(self.model_config).to(self.device)
        if base is not None:
            load_grown(self.model, base.model.to(self.device))
        if self.dist.rank:
            torch.manual_seed(config.seed + self.dist.rank)  # each process its own dropout masks
        # The model that trains: DDP averages the gradients over the processes.
        self.train_model = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.enabled
            else self.model
        )
        self.optimizer = make_optimizer(self.model, config)
        self.saved_step = -1
        self.last_save = time.monotonic()  # when rank 0 last wrote `last` (reset when training starts)

        self.step = 0
        self.position = StreamPosition()
        self.hidden: State | None = None  # carried across batches; None: zeros
        self._stop_signal: StopSignal | None = None  # while run() runs
        self.elapsed = self.plan.probe_seconds  # the probe of this machine counts in --max-time
        self.best_val = math.inf
        self.evals_without_improvement = 0
        self.run_dir = Path(config.out) if config.out else self._default_run_dir(saved)
        if saved:
            self._restore(saved)
            self._fit_position_to_layout(saved)
        self.chars_per_step = self.streams.batch_size * config.seq_len

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
        unknown = _unknown_count(tokens)
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
        return Path("checkpoints") / f"{corpus_name(self.config.data)}-{stamp}"

    # -- state for exact resume ---------------------------------------------------------------
    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything an exact resume needs. Under DDP every process must call it (it gathers)."""
        opt = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        # Each process's dropout RNG; the collective runs on the device (nccl wants CUDA tensors).
        for rank, rng in enumerate(self.dist.gather(torch.get_rng_state().to(self.device))):
            tensors["rng.cpu" if rank == 0 else f"rng.cpu.{rank}"] = rng.cpu()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        for index, values in opt["state"].items():
            for key, value in values.items():
                tensors[f"optim.{index}.{key}"] = value
        if self.hidden is not None:
            # The whole layout's state, rows in rank order: any process count can pick up its rows.
            for i, h in enumerate(self.hidden.tensors()):  # hidden.0 = h, hidden.1 = c (LSTM)
                tensors[f"hidden.{i}"] = self.dist.gather_rows(h)
        state = {
            "step": self.step,
            "epoch": self.position.epoch,
            "index": self.position.index,
            "elapsed": self.elapsed,
            "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
            "evals_without_improvement": self.evals_without_improvement,
            "param_groups": opt["param_groups"],
            "hidden_parts": 0 if self.hidden is None else len(self.hidden.tensors()),
            "world_size": self.dist.world_size,
        }
        return tensors, state

    def _restore(self, saved: Checkpoint) -> None:
        state, tensors = saved.state, saved.state_tensors
        try:
            _check_training_state(state)
            self.model.load_state_dict(saved.model.state_dict())
            optim_state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                if key.startswith("optim."):
                    _, index, name = key.split(".", 2)
                    optim_state.setdefault(int(index), {})[name] = value
            self.optimizer.load_state_dict({"state": optim_state, "param_groups": state["param_groups"]})
            rank = self.dist.rank
            rng = tensors.get("rng.cpu" if rank == 0 else f"rng.cpu.{rank}")
            if rng is not None:  # a process the saved run did not have keeps its fresh seed
                torch.set_rng_state(rng)
            if "rng.cuda" in tensors and self.device.type == "cuda":
                torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
            parts = [tensors[f"hidden.{i}"].to(self.device) for i in range(state["hidden_parts"])]
            layers, width = self.model_config.n_layers, self.model_config.hidden_size
            expected = len(CELL_TABLE[self.model_config.cell].state_names)
            if any(p.dim() != 3 or (p.size(0), p.size(2)) != (layers, width) or not p.is_floating_point() for p in parts) or (
                parts and len(parts) != expected
            ):
                raise ValueError(f"saved hidden state does not fit a {layers}x{width} {self.model_config.cell} model")
            self.hidden = State.from_tensors(parts) if parts else None
            if self.hidden is not None and self.hidden.streams == self.streams.batch_size:  # same global layout
                self.hidden = self.hidden.select(self.streams.rows)
            self.step = int(state["step"])
            self.position = StreamPosition(int(state["epoch"]), int(state["index"]))
            self.elapsed = float(state["elapsed"])
            best = state["best_val_loss"]
            self.best_val = math.inf if best is None else float(best)
            self.evals_without_improvement = int(state["evals_without_improvement"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{saved.path} holds training state this run cannot use ({exc})") from None

    def _fit_position_to_layout(self, saved: Checkpoint) -> None:
        """A resumed run whose batches are laid out differently starts the next epoch afresh.

        The saved stream position and hidden state belong to the saved layout: with another
        --batch-size or --seq-len (or a shorter corpus) they point at other text, or past its end.
        """
        saved_train = saved.meta.get("train", {})
        # The layout depends on the global batch: 2 processes x 4 rows resume as 1 x 8 exactly.
        saved_global = saved_train.get("batch_size", 0) * saved.state.get("world_size", 1)
        changed = []
        if saved_global != self.streams.batch_size:
            changed.append(
                "--batch-size"
                if self.dist.world_size == saved.state.get("world_size", 1)
                else "the global batch (--batch-size x processes)"
            )
        if saved_train.get("seq_len") != self.config.seq_len:
            changed.append("--seq-len")
        pos = self.position
        if (changed and pos.index > 0) or pos.index >= self.streams.batches_in_epoch(pos.epoch):
            self.position, self.hidden = StreamPosition(pos.epoch + 1, 0), None
            why = f"{' and '.join(changed)} changed" if changed else "the corpus is shorter than it was"
            self.message(
                f"note: {why}, so the saved place in the batch streams no longer applies; training goes on "
                f"from the start of epoch {self.position.epoch}"
            )
        elif changed:
            self.hidden = None

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
            f"vocab {self.tokenizer.vocab_size}, {len(self.train_tokens):,} train / {len(self.val_tokens):,} val chars, "
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
        }

    def checkpoint(self) -> None:
        """Evaluate on the whole validation split and save ``last`` (and ``best`` if it improved).

        Under DDP every process calls this (the state is gathered from all of them), and
        rank 0 alone evaluates, logs and writes.
        """
        tensors, state = self._state()
        self.saved_step = self.step
        if not self.dist.is_main:
            return
        val = evaluate(self.model, self.val_tokens, self.device, self.dtype)
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

    def save(self) -> None:
        """Save ``last`` without evaluating (``--save-every``): what a crash or a restart goes on from.

        Under DDP every process calls this (the state is gathered); rank 0 writes.
        """
        tensors, state = self._state()
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
            return f"no improvement in {c.patience} evaluations (--patience)"
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
        with self._run_dir_lock():
            self.model.train()
            self.last_save = time.monotonic()  # --save-every counts from the start of training
            stop_signal = self._stop_signal = StopSignal()
            try:
                result = self._loop(stop_signal)
            finally:
                trigger(self.callbacks, "on_close", self)
            self.dist.barrier()  # nobody leaves while rank 0 still writes
        return result

    @contextmanager
    def _run_dir_lock(self) -> Iterator[None]:
        """Rank 0 creates the run directory and holds its lock: one training writes into a run at a time.

        The lock is the kernel's (``flock``), so a run killed with SIGKILL leaves none behind.
        """
        with ExitStack() as held:
            if self.dist.is_main:
                try:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ConfigError(
                        f"cannot create the run directory {self.run_dir}: {exc.strerror or exc}; choose another --out"
                    ) from None
                try:
                    held.enter_context(folder_lock(self.run_dir))
                except FolderBusyError as exc:
                    raise ConfigError(
                        f"{self.run_dir} is being written by another training ({exc.strerror}): wait for it to end, "
                        "or choose another --out"
                    ) from None
                except OSError as exc:
                    raise ConfigError(
                        f"cannot write to the run directory {self.run_dir}: {exc.strerror or exc}; make it writable "
                        "or choose another --out"
                    ) from None
                for name in ("best", "last"):  # refused now, not after the training it would cost
                    check_replaceable(self.run_dir / name)
            yield

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
    try:
        return Trainer(config, model_config, explicit, callbacks, preview).run()
    except CharRNNError as exc:
        # A user's mistake (a corpus gone, a bad flag, a full disk) meets every restart again:
        # end the torchrun job with its message rather than restart it --max-restarts times.
        # A lost peer is the failure restarts are for.
        if not isinstance(exc, PeerLostError) and dist.end_restarts():
            _warn("warning: ended the torchrun job instead of restarting it: a restart would meet the error below again")
        raise
    finally:
        dist.stop()

"""Typed, validated configuration: what the model is, how to train it, how to sample.

Each field's ``help`` metadata doubles as the command-line help, so the flags and the
library never disagree. Validation happens on creation (``__post_init__``): a config
that exists is a config that works. Errors name fields (``hidden_size``), as a library
caller writes them; the CLI reports them as its flags (``--hidden-size``).
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16")
NEW_CHARS = ("grow", "unk")  # what a fine-tuned run does with characters its model never saw
LOGGERS = ("none", "tensorboard")
MAX_SEED = (1 << 63) - 1  # torch.Generator takes 64 bits; 63 leave room for the per-process offsets
MAX_LOGPROBS = 20  # alternatives reported per character, as OpenAI's top_logprobs
# Constraints are compiled for each request: their size is bounded before the compiler sees them.
MAX_REGEX_CHARS, MAX_CHOICES, MAX_CHOICE_CHARS, MAX_SCHEMA_CHARS = 10_000, 1_000, 1_000, 100_000


def check_seed(seed: int | None, name: str = "seed") -> None:
    """A seed is None (fresh) or an integer in [0, 2**63 - 1]: the one rule for every front end."""
    _check(
        seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED),
        f"{name} must be an integer from 0 to {MAX_SEED:,} (2**63 - 1), got {seed!r}",
    )


def field_help(text: str, **extra: Any) -> dict[str, Any]:
    """A config field's metadata: its ``help`` (the command-line help of its flag) and any
    ``extra`` keys the CLI reads (``cli=False``, ``choices``, ``auto``)."""
    return {"help": text, **extra}


def parse_shares(text: str) -> tuple[float, ...]:
    """``0.7,0.3`` -> (0.7, 0.3): the ``--mix`` flag's value."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"mix must be numbers separated by commas, e.g. 0.7,0.3, got {text!r}") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


_NUMBER_KINDS = {int: numbers.Integral, float: numbers.Real}  # so numpy scalars pass too
_KIND_NAMES = {numbers.Integral: "int", numbers.Real: "float", type(None): "None"}


@functools.cache
def _field_kinds(cls: type) -> dict[str, tuple[type, ...]]:
    """For each field, the classes its value may be (fields typed otherwise are not checked)."""
    kinds: dict[str, tuple[type, ...]] = {}
    for name, hint in typing.get_type_hints(cls).items():
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        accepted = [typing.get_origin(o) or o for o in options]  # tuple[str, ...] -> tuple
        if all(isinstance(a, type) for a in accepted):
            kinds[name] = tuple(_NUMBER_KINDS.get(a, a) for a in accepted)
    return kinds


def _check_types(config: Any) -> None:
    """Values of the declared types: a config read from a damaged file fails here, clearly."""
    for name, accepted in _field_kinds(type(config)).items():
        value = getattr(config, name)
        is_number = numbers.Integral in accepted or numbers.Real in accepted
        if not isinstance(value, accepted) or (isinstance(value, bool) and is_number):  # True is not a size
            wanted = " or ".join(_KIND_NAMES.get(t, t.__name__) for t in accepted)
            raise ConfigError(f"{name} must be {wanted}, got {value!r}")


# The dropout rates of a model, each in [0, 1): `dropout` first, then the ones added with weight drop.
REGULARISATION = ("dropout", "input_dropout", "embedding_dropout", "weight_drop")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a CharRNN. Changing any of these makes a different model."""

    vocab_size: int = field(default=0, metadata=field_help("characters in the vocabulary (set from the corpus)", cli=False))
    cell: str = field(default="lstm", metadata=field_help(f"recurrent cell: {', '.join(CELLS)}", choices=CELLS))
    n_layers: int | None = field(
        default=None, metadata=field_help("stacked recurrent layers (auto: chosen from the budget)", auto=True)
    )
    hidden_size: int | None = field(
        default=None, metadata=field_help("units per recurrent layer (auto: chosen from the budget)", auto=True)
    )
    embedding_size: int = field(default=64, metadata=field_help("size of the character embedding"))
    dropout: float | None = field(
        default=None,
        metadata=field_help(
            "dropout between layers and before the output head, the same mask through a sequence, in [0, 1) "
            "(auto: 0 for a run that reads the corpus up to four times, more beyond)",
            auto=True,
        ),
    )
    # The regularisation of a corpus read many times (AWD-LSTM); training only, sampling never sees it.
    input_dropout: float | None = field(
        default=None,
        metadata=field_help(
            "dropout on the embedded input, the same mask through a sequence, in [0, 1) (auto: chosen with --weight-drop)",
            auto=True,
        ),
    )
    embedding_dropout: float | None = field(
        default=None,
        metadata=field_help(
            "the share of characters whose embedding is zeroed for a whole step, in [0, 1) (auto: chosen with --weight-drop)",
            auto=True,
        ),
    )
    weight_drop: float | None = field(
        default=None,
        metadata=field_help(
            "dropout on the recurrent (hidden-to-hidden) weights, one mask a step, in [0, 1) (auto: for a model larger "
            "than its corpus supports, read many times)",
            auto=True,
        ),
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.cell in CELLS, f"unknown cell {self.cell!r}: choose one of {', '.join(CELLS)}")
        _check(self.vocab_size >= 0, f"vocab_size must be >= 0, got {self.vocab_size}")
        _check(self.n_layers is None or self.n_layers >= 1, f"n_layers must be at least 1, got {self.n_layers}")
        _check(self.hidden_size is None or self.hidden_size >= 1, f"hidden_size must be at least 1, got {self.hidden_size}")
        _check(self.embedding_size >= 1, f"embedding_size must be at least 1, got {self.embedding_size}")
        for name in REGULARISATION:
            value = getattr(self, name)
            _check(value is None or (0.0 <= value < 1.0 and math.isfinite(value)), f"{name} must be in [0, 1), got {value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def unresolved(self) -> list[str]:
        """Settings still at auto (None): a model can be built once the budget has chosen them.

        The rates added with weight drop are not among them: a model built with them at auto
        trains without them (the budget chooses them only for a run it plans).
        """
        return [name for name in ("n_layers", "hidden_size", "dropout") if getattr(self, name) is None]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        _check(not unknown, f"unknown model settings {sorted(unknown)}")
        # A checkpoint saved before a regularisation setting existed trained without it.
        return cls(**{**{name: 0.0 for name in REGULARISATION[1:]}, **values})


@dataclass(frozen=True)
class TrainConfig:
    """How to train: data, budgets, optimisation, evaluation, output."""

    data: str | tuple[str, ...] = field(
        default="shakespeare",
        metadata=field_help(
            "corpus: 'shakespeare', a .txt file, a folder of text files, or hf:OWNER/NAME; give it several times "
            "to train on several corpora with one vocabulary (see --mix)",
            repeat=True,
        ),
    )
    mix: tuple[float, ...] | None = field(
        default=None,
        metadata=field_help(
            "with several --data, the share of training characters drawn from each, e.g. 0.7,0.3 (default: in "
            "proportion to their sizes)",
            parse=parse_shares,
        ),
    )
    val_data: str | None = field(
        default=None,
        metadata=field_help(
            "validate on all of this text (a file, a folder or hf:OWNER/NAME), and train on all of --data "
            "(default: the last 10%% of --data, of each file for a folder; an hf: dataset's own validation split)"
        ),
    )
    hf_split: str = field(default="train", metadata=field_help("split of an hf: dataset to train on"))
    hf_column: str | None = field(
        default=None, metadata=field_help("text column of an hf: dataset (default: 'text' or the only string column)")
    )
    max_vocab: int = field(
        default=0, metadata=field_help("keep the N most frequent characters; rarer ones read as <unk> (0: keep all)")
    )
    out: str | None = field(default=None, metadata=field_help("run directory (default: checkpoints/<data>-<time>)"))
    resume: str | None = field(
        default=None, metadata=field_help("continue training from this checkpoint (a run's 'last' directory)")
    )
    init_from: str | None = field(
        default=None,
        metadata=field_help(
            "fine-tune: start a new run from this checkpoint's weights and vocabulary (a run, its best/last, or "
            "hf:OWNER/NAME), with a fresh optimizer, schedule and step count; the model shape comes from it"
        ),
    )
    new_chars: str = field(
        default="grow",
        metadata=field_help(
            "with --init-from, characters of the corpus the model never saw: grow gives each new embedding and "
            "output rows, unk reads them as <unk>",
            choices=NEW_CHARS,
        ),
    )
    seq_len: int | None = field(default=None, metadata=field_help("characters per truncated-BPTT chunk (auto: 64)", auto=True))
    batch_size: int | None = field(
        default=None,
        metadata=field_help(
            "parallel streams per step, per process (under torchrun the global batch is this x the number of processes; auto: 32)",
            auto=True,
        ),
    )
    lr: float | None = field(
        default=None, metadata=field_help("peak learning rate (AdamW; auto: smaller for wider layers)", auto=True)
    )
    min_lr: float | None = field(
        default=None, metadata=field_help("learning rate at the end of the cosine decay (auto: lr / 10)", auto=True)
    )
    warmup_iters: int | None = field(
        default=None, metadata=field_help("steps of linear warm-up (auto: 2%% of the steps the budget buys)", auto=True)
    )
    lr_decay_iters: int = field(
        default=0, metadata=field_help("steps of the cosine decay (0: decay over the budget, --max-iters or --max-time)")
    )
    weight_decay: float = field(default=0.1, metadata=field_help("AdamW weight decay on weight matrices"))
    grad_clip: float = field(default=1.0, metadata=field_help("clip the global gradient norm to this (0: off)"))
    max_iters: int = field(default=0, metadata=field_help("stop after this many steps (0: no step limit)"))
    max_time: float = field(
        default=300.0,
        metadata=field_help("stop after this many seconds of training steps; evaluations come on top (0: no time limit)"),
    )
    eval_interval: int | None = field(
        default=None, metadata=field_help("evaluate on the full validation split every N steps (auto: 8 times a run)", auto=True)
    )
    save_every: float = field(
        default=300.0,
        metadata=field_help(
            "also save a resumable 'last' at least this often, in seconds of wall-clock time, between evaluations "
            "(0: at evaluations only); a crashed or restarted run loses at most this much"
        ),
    )
    patience: int = field(default=5, metadata=field_help("stop after N evaluations without improvement (0: never)"))
    sample_chars: int = field(default=200, metadata=field_help("characters of sample text printed at each evaluation (0: none)"))
    seed: int = field(default=1337, metadata=field_help("random seed: same seed, same machine, same run"))
    device: str = field(default="auto", metadata=field_help("auto picks cuda, then mps, then cpu", choices=DEVICES))
    dtype: str = field(
        default="auto",
        metadata=field_help("training precision: auto uses bfloat16 autocast where the hardware has it", choices=DTYPES),
    )
    log: str = field(
        default="none",
        metadata=field_help(
            "also log the run live: tensorboard writes step loss, lr, val loss, throughput and samples to RUN/tensorboard",
            choices=LOGGERS,
        ),
    )
    plot: bool = field(
        default=True, metadata=field_help("draw the loss curves to RUN/training.png at the end (needs matplotlib)")
    )
    progress: bool = field(default=True, metadata=field_help("show a progress bar", cli=False))

    def __post_init__(self) -> None:
        # A list (read from config.json) is the tuple it was; one corpus is its name alone.
        for name in ("data", "mix"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.data, tuple) and len(self.data) == 1:
            object.__setattr__(self, "data", self.data[0])
        _check_types(self)
        _check(bool(self.data) and all(isinstance(d, str) and d for d in self.sources), "data must name a corpus")
        if self.mix is not None:
            _check(
                len(self.mix) == len(self.sources),
                f"mix gives {len(self.mix)} shares for {len(self.sources)} corpora: give one share per data source",
            )
            _check(
                all(isinstance(p, numbers.Real) and math.isfinite(p) and p >= 0 for p in self.mix) and sum(self.mix) > 0,
                f"mix shares must be numbers >= 0, not all zero, got {','.join(map(str, self.mix))}",
            )
        _check(self.max_vocab == 0 or self.max_vocab >= 2, f"max_vocab must be 0 (all) or at least 2, got {self.max_vocab}")
        _check(self.seq_len is None or self.seq_len >= 1, f"seq_len must be at least 1, got {self.seq_len}")
        _check(self.batch_size is None or self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        _check(self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), f"lr must be a positive number, got {self.lr}")
        _check(
            self.min_lr is None or (0 <= self.min_lr <= (self.lr if self.lr is not None else math.inf)),
            f"min_lr must be in [0, lr], got {self.min_lr}",
        )
        _check(self.warmup_iters is None or self.warmup_iters >= 0, f"warmup_iters must be >= 0, got {self.warmup_iters}")
        _check(self.lr_decay_iters >= 0, f"lr_decay_iters must be >= 0, got {self.lr_decay_iters}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        _check(self.max_iters >= 0, f"max_iters must be >= 0, got {self.max_iters}")
        _check(self.max_time >= 0, f"max_time must be >= 0, got {self.max_time}")
        _check(
            self.max_iters > 0 or self.max_time > 0,
            "set a budget: max_iters or max_time must be positive, or training never ends",
        )
        _check(
            self.eval_interval is None or self.eval_interval >= 1, f"eval_interval must be at least 1, got {self.eval_interval}"
        )
        _check(
            self.save_every >= 0 and math.isfinite(self.save_every),
            f"save_every must be a number of seconds >= 0 (0: save at evaluations only), got {self.save_every}",
        )
        _check(self.patience >= 0, f"patience must be >= 0, got {self.patience}")
        _check(self.sample_chars >= 0, f"sample_chars must be >= 0, got {self.sample_chars}")
        check_seed(self.seed)
        _check(self.device in DEVICES, f"unknown device {self.device!r}: choose one of {', '.join(DEVICES)}")
        _check(self.dtype in DTYPES, f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        _check(self.new_chars in NEW_CHARS, f"unknown new_chars {self.new_chars!r}: choose one of {', '.join(NEW_CHARS)}")
        _check(self.log in LOGGERS, f"unknown log {self.log!r}: choose one of {', '.join(LOGGERS)}")
        _check(
            not (self.resume and self.init_from),
            "resume continues a run and init_from starts a new one from a trained model: give one of them",
        )

    @property
    def sources(self) -> tuple[str, ...]:
        """The corpora it trains on: ``data`` as a tuple, one or several."""
        return (self.data,) if isinstance(self.data, str) else self.data

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SampleConfig:
    """How to pick each next character."""

    length: int = field(default=500, metadata=field_help("characters to generate"))
    temperature: float = field(default=0.8, metadata=field_help("softmax temperature; 0 means greedy"))
    top_k: int = field(default=0, metadata=field_help("sample from the k likeliest characters only (0: off)"))
    top_p: float = field(default=1.0, metadata=field_help("nucleus sampling: smallest set with this much probability (1: off)"))
    seed: int | None = field(default=None, metadata=field_help("random seed (default: a fresh one each run)"))
    stop: tuple[str, ...] = field(
        default=(), metadata=field_help("stop when the text produces this string (repeatable)", cli=False)
    )
    frequency_penalty: float = field(
        default=0.0,
        metadata=field_help(
            "OpenAI's: lower each character's logit by this times its count in the text generated so far (-2 to 2)"
        ),
    )
    presence_penalty: float = field(
        default=0.0,
        metadata=field_help("OpenAI's: lower the logit of each character the generated text holds already (-2 to 2)"),
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata=field_help(
            "Hugging Face's: divide the positive logits (multiply the negative ones) of the characters of the last "
            "--penalty-window generated characters by this (1: off)"
        ),
    )
    dry_multiplier: float = field(
        default=0.0,
        metadata=field_help(
            "DRY: a character that would continue a repeat of N >= --dry-allowed-length characters of the generated "
            "text loses dry_multiplier x dry_base^(N - allowed length) from its logit (0: off; 0.8 is a common start)"
        ),
    )
    dry_base: float = field(default=1.75, metadata=field_help("DRY: how fast its penalty grows with the repeat's length"))
    dry_allowed_length: int = field(default=2, metadata=field_help("DRY: the longest repeat left unpenalised"))
    penalty_window: int = field(
        default=256, metadata=field_help("the repetition penalty and DRY look at this many last generated characters")
    )
    logprobs: int | None = field(
        default=None,
        metadata=field_help(
            f"return each generated character's log-probability and the K likeliest alternatives (0 to {MAX_LOGPROBS}; "
            "off when not given)"
        ),
    )
    # Structured outputs (charrnn.generation.constraints): at most one of the three.
    regex: str | None = field(default=None, metadata=field_help("the text must match this regular expression"))
    choices: tuple[str, ...] = field(default=(), metadata=field_help("the text must be one of these strings", cli=False))
    json_schema: str | None = field(
        default=None, metadata=field_help("the text must be JSON that fits this JSON schema (its JSON text)", cli=False)
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.length >= 0, f"length must be >= 0, got {self.length}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(-2 <= value <= 2, f"{name} must be between -2 and 2 (0 turns it off), got {value}")
        _check(
            self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
            f"repetition_penalty must be a positive number (1 turns it off), got {self.repetition_penalty}",
        )
        _check(
            0 <= self.dry_multiplier <= 100,
            f"dry_multiplier must be between 0 and 100 (0 turns it off), got {self.dry_multiplier}",
        )
        _check(1 <= self.dry_base <= 10, f"dry_base must be between 1 and 10, got {self.dry_base}")
        _check(self.dry_allowed_length >= 1, f"dry_allowed_length must be at least 1, got {self.dry_allowed_length}")
        _check(1 <= self.penalty_window <= 100_000, f"penalty_window must be between 1 and 100,000, got {self.penalty_window}")
        _check(
            self.temperature >= 0 and math.isfinite(self.temperature),
            f"temperature must be >= 0 (0 means greedy), got {self.temperature}",
        )
        # Any k >= the vocabulary keeps every character, as 0 does; the sampler clamps it there.
        _check(self.top_k >= 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        check_seed(self.seed)
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        _check(
            self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
            f"logprobs must be from 0 to {MAX_LOGPROBS} alternatives, got {self.logprobs}",
        )
        given = [name for name in ("regex", "choices", "json_schema") if getattr(self, name)]
        _check(len(given) <= 1, f"{' and '.join(given)} were both given: constrain the text by one of them")
        _check(self.regex != "", "regex is empty: give a pattern, or leave it out")
        _check(
            len(self.regex or "") <= MAX_REGEX_CHARS,
            f"regex has {len(self.regex or ''):,} characters; the limit is {MAX_REGEX_CHARS:,}",
        )
        _check(
            len(self.choices) <= MAX_CHOICES and all(isinstance(c, str) and 0 < len(c) <= MAX_CHOICE_CHARS for c in self.choices),
            f"choices must be at most {MAX_CHOICES} non-empty strings of at most {MAX_CHOICE_CHARS:,} characters",
        )
        _check(
            len(self.json_schema or "") <= MAX_SCHEMA_CHARS,
            f"json_schema has {len(self.json_schema or ''):,} characters of JSON; the limit is {MAX_SCHEMA_CHARS:,}",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether a penalty looks at the generated text (each pick then depends on the ones before)."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1 or self.dry_multiplier)

    @property
    def constrained(self) -> bool:
        """Whether the text must match a regex, be one of some choices or fit a JSON schema."""
        return bool(self.regex or self.choices or self.json_schema)

    @property
    def controlled(self) -> bool:
        """Whether each pick runs through the controls in torch (penalties, a constraint, log-probabilities)."""
        return self.penalized or self.constrained or self.logprobs is not None

    @classmethod
    def from_options(cls, base: "SampleConfig | None" = None, **options: Any) -> "SampleConfig":
        """``base`` (default: the defaults) with ``options`` as a front end passes them: None
        means "not given", and ``stop`` may be one string or any sequence of strings."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        _check(not unknown, f"unknown sampling option(s) {', '.join(unknown)}; the options are {', '.join(sorted(names))}")
        values = asdict(base) if base is not None else {}
        values.update({k: v for k, v in options.items() if v is not None})
        for name in ("stop", "choices"):
            values[name] = _strings(values.get(name, ()), name)
        schema = values.get("json_schema")
        if schema is not None and not isinstance(schema, str):  # a schema given as the object it is
            try:
                values["json_schema"] = json.dumps(schema)
            except (TypeError, ValueError):
                raise ConfigError("json_schema must be a JSON schema, as a dict or its JSON text") from None
        return cls(**values)


def _strings(value: Any, name: str) -> tuple[str, ...]:
    """One string, or any sequence of strings, as a tuple (``stop``, ``choices``)."""
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be a string or a list of strings, got {value!r}") from None


SAMPLE_DEFAULTS = SampleConfig()  # the one place every front end takes its sampling defaults from

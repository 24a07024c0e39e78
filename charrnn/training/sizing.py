"""What a budget buys: the model size, batch, learning rate and schedule of a run.

Every setting left at ``auto`` (``None`` in the configs) is chosen here from the
budget, so that ``python train.py --data shakespeare`` trains the best model this
machine can train in the time it is given, on a laptop CPU as on a GPU. The rule comes
from a measured scaling study (``benchmarks/budget.py``, written up in
``docs/scaling.md``); in short:

- **The budget in characters.** ``--max-iters`` gives it directly (steps x batch x
  sequence length). ``--max-time`` gives it through a short probe of this machine: a
  few timed training steps of a throwaway model (about a second), which say how many
  floating-point operations per second training gets here. The probe's time counts in
  the budget.
- **The size.** The largest candidate that still reads ``CHARS_PER_WEIGHT``
  characters per weight in that budget: with a short budget more, smaller steps beat
  fewer, bigger ones; with a long one a bigger model wins. The model is also kept
  below ``MAX_WEIGHTS_PER_CHAR`` weights per training character of the corpus, where
  more would only memorise it.
- **The rest.** Small batches (32 x 64: at a fixed budget the number of updates counts
  more than their size), a learning rate that shrinks as the layers widen, a warm-up
  of 2% of the planned steps, a cosine decay to a tenth over the budget, and dropout
  only when the run reads the corpus more than four times, rising with the number of
  times it does.
- **Small corpora** (data, not compute, limits the run). Where the size above would
  read the corpus more than ``MAX_EPOCHS`` times, the largest candidate that still reads
  it ``MAX_EPOCHS`` times, up to ``REGULARISED_WEIGHTS_PER_CHAR`` weights per character,
  takes its place. A model larger than its corpus supports (more than
  ``MAX_WEIGHTS_PER_CHAR``), auto or given, trains with the regularisation of AWD-LSTM
  (``AWD_RATES``: weight drop on the recurrent matrices, variational dropout on input
  and output, embedding dropout). A time budget that would read the corpus more than
  ``MAX_EPOCHS`` times (``REGULARISED_MAX_EPOCHS`` under weight drop) plans that many
  epochs and ends there: more would only memorise it, so a longer budget never trains a
  worse model. Evaluations come at least eight times a run, after every epoch, and at
  least every ``EVAL_SECONDS`` of training.
- **Precision.** ``--dtype auto`` trains in bfloat16 only where the probe measured it
  faster than float32 for the chosen size.

A setting the user gives always wins; the others are chosen around it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..config import REGULARISATION, ModelConfig, TrainConfig
from ..device import autocast
from ..errors import ConfigError
from ..model import CELL_TABLE, CharRNN

# (hidden size, layers), smallest first: the sizes the study measured.
CANDIDATES: tuple[tuple[int, int], ...] = (
    (128, 1),
    (256, 1),
    (256, 2),
    (384, 2),
    (512, 2),
    (768, 2),
    (1024, 2),
    (1024, 3),
)
CHARS_PER_WEIGHT = 4.0
MAX_WEIGHTS_PER_CHAR = 4.0
BATCH_SIZE, SEQ_LEN = 32, 64
BASE_LR, BASE_HIDDEN = 5e-3, 256  # lr = BASE_LR * sqrt(BASE_HIDDEN / hidden)
WARMUP_FRACTION = 0.02
MIN_LR_FRACTION = 0.1
EVALUATIONS = 8  # full-split evaluations a run makes at least; the last one comes at its end
# A run that reads its corpus more often than this ends once it has: at dropout 0.4 a 1x256 on a
# 135k-char training text was best after 15-17 epochs, whether its schedule planned 20 or 60
# (1.0784 / 1.0858), and 60 planned epochs ended at 1.23 (docs/scaling.md, fifth session).
MAX_EPOCHS = 24
# Under weight drop a 2x256 on the same text was still improving at 33 epochs (1.0428, best of all).
REGULARISED_MAX_EPOCHS = 40
# The largest model a data-limited run may choose: with AWD a 2x384 (14 weights per character)
# read 40 times beat the 2x256 (6.5) by 0.04 on the 135k-char text (docs/scaling.md, sixth session).
REGULARISED_WEIGHTS_PER_CHAR = 16.0
# The rates of the data-limited regime, as the study measured them on a 2x256 (docs/scaling.md).
AWD_RATES = {"dropout": 0.4, "input_dropout": 0.2, "embedding_dropout": 0.1, "weight_drop": 0.4}
EVAL_SECONDS = 120.0  # between two evaluations at most, where the probe measured the speed
FALLBACK_EVAL_INTERVAL = 250  # when nothing measured the steps a time budget buys
PROBE_SECONDS = 0.6  # per probed size; at most two sizes are probed
DROPOUT_FROM_EPOCHS = 4  # no dropout for runs that read the corpus at most this often
DROPOUT_RISE = ((10, 0.1), (18, 0.4))  # (epochs, dropout): flat before the first, after the last


@dataclass(frozen=True)
class Plan:
    """A run's settings with nothing left to choose, and what chose them."""

    config: TrainConfig
    model: ModelConfig
    probe_seconds: float  # spent measuring this machine; counted in the time budget
    chars_per_second: float | None  # the probe's measure of the chosen size (None: no probe)
    reason: str  # one line for the start of the run, e.g. "lstm 2x256 chosen for 300 s at ..."
    dtype: torch.dtype  # the precision the run trains in


def step_weights(hidden: int, layers: int, embedding: int, vocab: int, cell: str = "lstm") -> int:
    """Weights a character passes through (recurrent matrices and head; the embedding is a lookup)."""
    gates = CELL_TABLE[cell].gates
    first = gates * hidden * (embedding + hidden)
    rest = (layers - 1) * gates * hidden * (2 * hidden)
    return first + rest + hidden * vocab


def flops_per_char(model: ModelConfig) -> float:
    """Training cost of one character: 2 FLOPs per weight forward, 4 backward."""
    return 6.0 * step_weights(model.hidden_size, model.n_layers, model.embedding_size, model.vocab_size, model.cell)


def training_bytes(model: ModelConfig, batch: int, seq: int) -> int:
    """About how much memory training ``model`` on ``batch`` x ``seq`` steps takes.

    fp32 weights, gradients and two AdamW moments (16 bytes a parameter), plus what one
    step keeps for its backward pass: each layer's gate pre-activations and states, the
    embedding and three copies of the logits (logits, softmax, gradient) per character.
    """
    gates = CELL_TABLE[model.cell].gates
    params = step_weights(model.hidden_size, model.n_layers, model.embedding_size, model.vocab_size, model.cell)
    params += model.vocab_size * model.embedding_size
    per_char = model.n_layers * (gates + 3) * model.hidden_size + model.embedding_size + 3 * model.vocab_size
    return 16 * params + 4 * batch * seq * per_char


def device_memory_bytes(device: torch.device) -> int | None:
    """The memory a run on ``device`` can use at most: the GPU's, else the machine's RAM (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not every platform reports it
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**40 else f"{n / 2**40:,.1f} TiB"


def check_memory(model: ModelConfig, batch: int, seq: int, device: torch.device) -> None:
    """Refuse (``ConfigError``, with the estimate) a model or batch that cannot fit on ``device``."""
    need, have = training_bytes(model, batch, seq), device_memory_bytes(device)
    if have is not None and need > have:
        raise ConfigError(
            f"a {model.cell} {model.n_layers:,}x{model.hidden_size:,} (embedding {model.embedding_size:,}) trained on "
            f"{batch:,}x{seq:,} batches needs about {_gib(need)} of memory (weights, gradients, AdamW moments, "
            f"activations), but this {device.type} has {_gib(have)}: choose a smaller --hidden-size, --n-layers, "
            "--embedding-size, --batch-size or --seq-len"
        )


def learning_rate_for(hidden: int) -> float:
    """Peak AdamW learning rate for a width: wider layers take smaller steps."""
    return round(BASE_LR * math.sqrt(BASE_HIDDEN / hidden), 5)


def dropout_for(epochs: float) -> float:
    """No dropout for a run that reads the corpus a few times; more the more often it rereads it.

    Measured (docs/scaling.md): the 300 s runs (5 to 10 epochs) used 0.1; 2x512 for 30 min
    on Tiny Shakespeare, 18 epochs, overfitted with 0.2 (best 1.4262, then worse) and
    reached 1.4136 with 0.4. Between 10 and 18 epochs the rate rises in a straight line,
    so that the probe's noise (its figure moves by 10-20% from one second to the next on
    a shared machine) moves the rate a little, never from 0.1 to 0.4.
    """
    if epochs <= DROPOUT_FROM_EPOCHS:
        return 0.0
    (start, low), (end, high) = DROPOUT_RISE
    rise = min(max((epochs - start) / (end - start), 0.0), 1.0)
    return round(low + rise * (high - low), 2)


def measure_speed(
    model: ModelConfig, batch: int, seq: int, device: torch.device, dtype: torch.dtype, seconds: float = PROBE_SECONDS
) -> float:
    """Training characters per second of ``model`` here: a throwaway copy, timed steps on random text."""
    probe = CharRNN(model).to(device).train()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)  # the run's own RNG is left untouched
    x = torch.randint(model.vocab_size, (batch, seq + 1), generator=g).to(device)

    def step() -> None:
        with autocast(device, dtype):
            logits, _ = probe(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.item()  # the trainer's per-step work besides the model, so the probe is not optimistic
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(probe.parameters(), 1.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # the first call prepares kernels
    n, start = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - start < seconds:
        step()
        n += 1
    return n * batch * seq / (time.perf_counter() - start)


def choose_size(budget_chars: Callable[[int, int], float], model: ModelConfig, corpus_chars: int) -> tuple[int, int]:
    """The largest candidate (hidden, layers) that reads CHARS_PER_WEIGHT characters per weight.

    ``budget_chars(hidden, layers)`` is how many characters that size trains on in the
    budget. A size or layer count the user fixed narrows the candidates to those with it.
    Where that size would read the corpus more than ``MAX_EPOCHS`` times, data rather than
    compute limits the run: the largest candidate that still reads it ``MAX_EPOCHS``
    times, up to ``REGULARISED_WEIGHTS_PER_CHAR`` weights per character, is chosen.
    """
    options = [(h, n) for h, n in CANDIDATES if model.hidden_size in (None, h) and model.n_layers in (None, n)]
    if not options:  # the user fixed one of the two to a value no candidate has
        options = [(model.hidden_size or h, model.n_layers or n) for h, n in CANDIDATES]

    def weights(option: tuple[int, int]) -> int:
        return step_weights(*option, model.embedding_size, model.vocab_size, model.cell)

    options.sort(key=weights)
    fits = [
        o
        for o in options
        if budget_chars(*o) >= CHARS_PER_WEIGHT * weights(o) and weights(o) <= MAX_WEIGHTS_PER_CHAR * corpus_chars
    ]
    chosen = fits[-1] if fits else options[0]
    if budget_chars(*chosen) > MAX_EPOCHS * corpus_chars:
        larger = [
            o
            for o in options
            if budget_chars(*o) >= MAX_EPOCHS * corpus_chars and weights(o) <= REGULARISED_WEIGHTS_PER_CHAR * corpus_chars
        ]
        chosen = max([chosen, *larger], key=weights)
    return chosen


def regularisation_for(weights: int, corpus_chars: int, epochs: float) -> dict[str, float]:
    """The dropout rates of a model with ``weights`` step weights reading its corpus ``epochs`` times.

    A model larger than its corpus supports (``MAX_WEIGHTS_PER_CHAR``) that rereads it
    takes AWD-LSTM's regularisation; any other only the dropout of :func:`dropout_for`.
    """
    if weights > MAX_WEIGHTS_PER_CHAR * corpus_chars and epochs > DROPOUT_FROM_EPOCHS:
        return dict(AWD_RATES)
    return {name: dropout_for(epochs) if name == "dropout" else 0.0 for name in REGULARISATION}


def _with_regularisation(model: ModelConfig, corpus_chars: int, epochs: float) -> ModelConfig:
    """``model`` with every dropout rate left at auto chosen; the user's own stay."""
    weights = step_weights(model.hidden_size, model.n_layers, model.embedding_size, model.vocab_size, model.cell)
    rates = regularisation_for(weights, corpus_chars, epochs)
    return replace(model, **{name: rate for name, rate in rates.items() if getattr(model, name) is None})


def eval_interval(steps: int, corpus_chars: int, chars_per_step: int, speed: float | None) -> int:
    """Steps between full-split evaluations: at least ``EVALUATIONS`` a run, one an epoch, one every ``EVAL_SECONDS``.

    One evaluation reads the validation split (a ninth of the training text) forward
    only, about 4% of an epoch's training, so evaluating every epoch stays cheap and
    catches the best point of a run that rereads a small corpus.
    """
    interval = min(math.ceil(steps / EVALUATIONS), math.ceil(corpus_chars / chars_per_step))
    if speed:
        interval = min(interval, math.ceil(EVAL_SECONDS * speed / chars_per_step))
    return max(1, interval)


def _size(chars: int) -> str:
    return f"{chars / 1e6:.1f}M" if chars >= 1e6 else f"{chars / 1e3:.0f}k"


def _rate(chars: float) -> str:
    return f"{chars / 1000:,.1f}k chars/s" if chars < 1e6 else f"{chars / 1e6:,.2f}M chars/s"


def plan_run(
    config: TrainConfig,
    model: ModelConfig,
    corpus_chars: int,
    device: torch.device,
    dtype: torch.dtype,
    share: Callable[[float], float] = lambda value: value,
) -> Plan:
    """Fill every ``None`` (auto) setting of ``config`` and ``model`` from the budget.

    ``model.vocab_size`` must be set. ``corpus_chars`` is the training split's length.
    ``dtype`` is the precision ``--dtype`` resolved to; under ``auto`` (``config.dtype``)
    the probe may choose float32 instead, where it measured bfloat16 slower. ``share``
    makes every process of a distributed run use the same measured speed (rank 0's), so
    that they all choose the same model.
    """
    batch = config.batch_size or BATCH_SIZE
    seq = config.seq_len or SEQ_LEN
    chars_per_step = batch * seq
    step_chars = config.max_iters * chars_per_step if config.max_iters else math.inf  # what --max-iters allows
    sizes_auto = model.hidden_size is None or model.n_layers is None
    smallest = CANDIDATES[0]  # a size left at auto is at least this: fixed sizes are checked before anything is built
    check_memory(
        replace(model, hidden_size=model.hidden_size or smallest[0], n_layers=model.n_layers or smallest[1]), batch, seq, device
    )
    probe = bool(config.max_time) and (
        sizes_auto
        or config.warmup_iters is None
        or config.eval_interval is None
        or any(getattr(model, name) is None for name in REGULARISATION)
    )
    if probe:
        model, dtype, speed, probe_seconds, chars, precision = _probe(
            config, model, corpus_chars, batch, seq, device, dtype, share, step_chars
        )
    else:  # a step budget (or nothing left to choose): no probe
        if sizes_auto:
            hidden, layers = choose_size(lambda h, n: step_chars, model, corpus_chars)
            model = replace(model, hidden_size=hidden, n_layers=layers)
        speed, probe_seconds, chars, precision = None, 0.0, step_chars, ""
    # Unknown only when everything is given and the budget is time: then nothing below needs it.
    known = math.isfinite(chars)
    epochs = chars / max(corpus_chars, 1) if known else 0.0
    model = _with_regularisation(model, corpus_chars, epochs)
    max_epochs = REGULARISED_MAX_EPOCHS if model.weight_drop else MAX_EPOCHS
    capped = known and not config.max_iters and epochs > max_epochs
    if capped:  # a small corpus: the run ends once it has read it max_epochs times
        chars, epochs = max_epochs * corpus_chars, float(max_epochs)
    steps = max(1, int(chars // chars_per_step)) if known else 0
    lr = config.lr if config.lr is not None else learning_rate_for(model.hidden_size)
    config = replace(
        config,
        batch_size=batch,
        seq_len=seq,
        lr=lr,
        min_lr=config.min_lr if config.min_lr is not None else round(lr * MIN_LR_FRACTION, 6),
        warmup_iters=config.warmup_iters if config.warmup_iters is not None else max(1, round(WARMUP_FRACTION * steps)),
        eval_interval=config.eval_interval
        or (eval_interval(steps, corpus_chars, chars_per_step, speed) if known else FALLBACK_EVAL_INTERVAL),
        max_iters=steps if capped else config.max_iters,
    )
    plan = f"about {steps:,} steps of {batch}x{seq} ({epochs:.1f} epochs)" if known else f"steps of {batch}x{seq}"
    if capped:
        plan += (
            f", about {steps * chars_per_step / speed:.0f} s: the corpus read {max_epochs} times, "
            "where more would only memorise it"
        )
    budget = f"{config.max_time:g} s" if config.max_time else f"{config.max_iters:,} steps"
    reason = (
        f"{model.cell} {model.n_layers}x{model.hidden_size} {'chosen' if sizes_auto else 'given'} for {budget}"
        f"{f' at {_rate(speed)}' if speed else ''}{precision} on a {_size(corpus_chars)}-char corpus: "
        f"{plan}, lr {lr:g}, {_describe_regularisation(model, corpus_chars)}, evaluation every {config.eval_interval:,} steps"
    )
    return Plan(config, model, probe_seconds, speed, reason, dtype)


def _probe(
    config: TrainConfig,
    model: ModelConfig,
    corpus_chars: int,
    batch: int,
    seq: int,
    device: torch.device,
    dtype: torch.dtype,
    share: Callable[[float], float],
    step_chars: float,
) -> tuple[ModelConfig, torch.dtype, float, float, float, str]:
    """Time this machine and choose the size (and, under ``--dtype auto``, the precision).

    Returns the model with its size, the precision, the chosen size's speed (chars/s),
    the seconds the probe took, the characters the rest of the budget trains on, and a
    note on the precision for the first line (empty when nothing was chosen).
    """
    start = time.perf_counter()
    # Measure FLOP/s on a mid-sized model, choose the size, then measure the chosen one.
    probe_model = replace(model, hidden_size=model.hidden_size or 256, n_layers=model.n_layers or 1)
    probe_model = replace(probe_model, **{name: 0.0 for name in REGULARISATION})
    flop_rate = share(measure_speed(probe_model, batch, seq, device, dtype)) * flops_per_char(probe_model)
    remaining = max(config.max_time - (time.perf_counter() - start), 0.0)

    def budget_chars(h: int, n: int) -> float:
        return min(flop_rate * remaining / flops_per_char(replace(probe_model, hidden_size=h, n_layers=n)), step_chars)

    sizes_auto = model.hidden_size is None or model.n_layers is None
    hidden, layers = choose_size(budget_chars, model, corpus_chars) if sizes_auto else (model.hidden_size, model.n_layers)
    # Timed with the regularisation the first estimate gives it, since dropout costs speed (0.27
    # cost a 2x384 13% here); the refined estimate sets the run's rates, usually the same.
    sized = replace(model, hidden_size=hidden, n_layers=layers)
    chosen = _with_regularisation(sized, corpus_chars, budget_chars(hidden, layers) / max(corpus_chars, 1))
    speed = (
        flop_rate / flops_per_char(chosen) if chosen == probe_model else share(measure_speed(chosen, batch, seq, device, dtype))
    )
    precision = ""
    if config.dtype == "auto" and dtype != torch.float32:
        # bfloat16 is not faster everywhere: small models on some CPUs train faster in float32.
        fp32 = share(measure_speed(chosen, batch, seq, device, torch.float32))
        name = str(dtype).removeprefix("torch.")
        if fp32 > speed:
            precision = f" in float32 (measured faster here than {name}: {_rate(fp32)} against {_rate(speed)})"
            dtype, speed = torch.float32, fp32
        else:
            precision = f" in {name} (measured faster here than float32: {_rate(fp32)})"
    probe_seconds = time.perf_counter() - start
    chars = min(speed * max(config.max_time - probe_seconds, 0.0), step_chars)
    return sized, dtype, speed, probe_seconds, chars, precision


def _describe_regularisation(model: ModelConfig, corpus_chars: int) -> str:
    """The dropout rates for the first line: under weight drop every rate and why (which regime the run is in)."""
    if not model.weight_drop and not model.input_dropout and not model.embedding_dropout:
        return f"dropout {model.dropout:g}"
    weights = step_weights(model.hidden_size, model.n_layers, model.embedding_size, model.vocab_size, model.cell)
    rates = (
        f"dropout {model.dropout:g}, input dropout {model.input_dropout:g}, embedding dropout "
        f"{model.embedding_dropout:g}, weight drop {model.weight_drop:g}"
    )
    if weights <= MAX_WEIGHTS_PER_CHAR * corpus_chars:  # not the regime's own choice: the user's rates
        return f"AWD-LSTM's regularisation as given: {rates}"
    return f"{weights / max(corpus_chars, 1):.1f} weights per training character, so AWD-LSTM's regularisation: {rates}"

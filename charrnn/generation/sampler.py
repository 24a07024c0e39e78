"""The Sampler: a loaded model that writes, and its public continuation API.

Everything here carries the hidden state forward one character at a time over a
pre-packed stepper (``charrnn.generation.stepper`` / ``native``); nothing re-reads a
prefix. Each call draws from its own ``torch.Generator``, so the same seed gives the
same text, and threads can share one :class:`Sampler`.

The continuation API is what the chat session, the server and a user's own code build
on::

    context = sampler.read("ROMEO:\n")              # the state after a text
    reply = sampler.continue_from(context, length=200, stop="\n\n")
    for piece in reply:                              # pieces as they are sampled
        print(piece, end="")
    context = reply.context                          # right after the text shown, stop string left out
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import find_latest_checkpoint, load_checkpoint
from ..config import MAX_LOGPROBS, SampleConfig
from ..device import cpu_has_fast_bf16, resolve_device
from ..errors import ConfigError, PromptError
from ..evaluation import DYNAMIC_LR, dynamic_evaluate, evaluate
from ..model import CharRNN, State
from ..tokenizer import CharTokenizer
from .chat import ChatSession
from .constraints import compile_constraint
from .native import BatchedStepper, NativeStepper, has_tiles, load_kernel
from .processors import Controls, TokenLogprob, new_generator
from .stepper import Context, StateAfter, Stepper, choose_stepper, run_steps
from .stops import StopScanner

MAX_PROMPT_CHARS = 100_000
MAX_SAMPLES = 4096  # streams sampled side by side in one call
MAX_BEAM = 64
PRECISIONS = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
_PRIME_CHUNK = 2048
_SAMPLE_CHUNK = 64  # characters sampled per call before the text is scanned for stop strings

AnyStepper = Stepper | NativeStepper | BatchedStepper


def sample_steps(
    stepper: AnyStepper,
    logits: torch.Tensor,
    hidden: State,
    config: SampleConfig,
    uniforms: torch.Tensor,
    every_state: bool = True,
) -> tuple[torch.Tensor, StateAfter]:
    """K characters for B streams from the state before them, one uniform each (``uniforms``, (K, B)).

    Returns the tokens (K, B) and ``state(j)``: the logits and hidden state right after
    token j, so a caller can stop after any of them. Without ``every_state`` only the
    state after the last token need be kept.
    """
    top_k = min(config.top_k, logits.size(-1))  # k past the vocabulary keeps all; a huge k must not overflow int64
    return stepper.sample(logits, hidden, uniforms, config.temperature, top_k, config.top_p, every_state)


class _Run:
    """The sampling loop for B streams: tokens in chunks, decoded, watched for stop strings.

    With ``track``, it remembers the states of the last chunks, enough to give the
    context right after the text of stream 0 that was released (:attr:`context`).
    """

    def __init__(self, sampler: "Sampler", context: Context, config: SampleConfig, generator: torch.Generator, track: bool):
        self.sampler, self.start, self.config, self.generator, self.track = sampler, context, config, generator, track
        self.streams = context.logits.size(0)
        self.scanners = [StopScanner(config.stop) for _ in range(self.streams)]
        self.produced = 0  # tokens sampled per stream so far
        self.finish_reason: str | None = None
        # (index of its first token, token count, state after each) of the chunks the context may
        # still rewind into: at most the longest stop string back from the newest token.
        self.recent: list[tuple[int, int, StateAfter]] = []
        self.reach = max((len(stop) for stop in config.stop), default=0)
        # Penalties, a constraint and log-probabilities pick in torch between the stepper's steps.
        constraint = compile_constraint(sampler.tokenizer, config)
        self.controls = (
            Controls(config, self.streams, sampler.tokenizer, context.logits.device, constraint) if config.controlled else None
        )
        self.shown = [0] * self.streams  # characters released per stream: their log-probabilities are the first so many

    def chunks(self) -> Iterator[tuple[torch.Tensor, StateAfter]]:
        """``config.length`` tokens per stream, as ``sample_steps`` chunks; the uniforms come
        from the generator in order, so the text does not depend on the chunk size."""
        stepper = self.sampler.stepper(self.streams)
        logits, hidden, length, controls = self.start.logits, self.start.hidden, self.config.length, self.controls
        with torch.no_grad():
            for produced in range(0, length, _SAMPLE_CHUNK):
                count = min(_SAMPLE_CHUNK, length - produced)
                uniforms = torch.rand(count, self.streams, generator=self.generator, dtype=torch.float64)
                if controls is not None:
                    tokens, state = run_steps(
                        stepper.step, controls.pick, logits, hidden, uniforms, self.track, lambda: controls.finished
                    )
                else:
                    tokens, state = sample_steps(stepper, logits, hidden, self.config, uniforms, self.track)
                logits, hidden = state(len(tokens) - 1)
                yield tokens, state
                if len(tokens) < count:
                    return

    def pieces(self) -> Iterator[tuple[int, str]]:
        """(stream, text) pieces as soon as each is safe to show; stop strings never are."""
        active = list(range(self.streams))
        decode = self.sampler.tokenizer.decode
        ended = self.controls.ended if self.controls is not None else [None] * self.streams
        completed = 0  # streams whose constraint ended them
        for tokens, state in self.chunks():
            if self.track:
                self._remember(len(tokens), state)
            for ids in tokens.tolist():
                self.produced += 1
                for i in active:
                    if ended[i] == self.produced - 1:  # its constraint is complete: the text held back is said
                        piece = self.scanners[i].flush()
                        # The placeholder just picked is the one token not shown: the context rewinds past it.
                        self.scanners[i].done, self.scanners[i].stop_length = True, 1
                        completed += 1
                    else:
                        piece = self.scanners[i].push(decode((ids[i],)))
                    if piece:
                        self.shown[i] += len(piece)
                        yield i, piece
                active = [i for i in active if not self.scanners[i].done]
                if not active:
                    self.finish_reason = "stop"
                    return
        for i in active:
            if ended[i] is not None:
                completed += 1
            piece = self.scanners[i].flush()
            if piece:
                self.shown[i] += len(piece)
                yield i, piece
        self.finish_reason = "stop" if len(active) < self.streams or completed else "length"

    def logprobs(self, stream: int = 0) -> list[TokenLogprob]:
        """The log-probabilities of the characters of ``stream`` released so far (``config.logprobs`` must be set)."""
        if self.controls is None or self.controls.logprobs is None:
            raise RuntimeError("log-probabilities were not asked for: sample with logprobs=K")
        return self.controls.logprobs[stream][: self.shown[stream]]

    def _remember(self, count: int, state: StateAfter) -> None:
        self.recent.append((self.produced, count, state))
        horizon = self.produced + count - 1 - self.reach  # the earliest token the context can rewind to
        while len(self.recent) > 1 and self.recent[0][0] + self.recent[0][1] - 1 < horizon:
            self.recent.pop(0)

    def context(self) -> Context:
        """The context right after the text of stream 0 released so far."""
        if not self.track:
            raise RuntimeError("this continuation was made without keep_context")
        scanner = self.scanners[0]
        unshown = scanner.stop_length if scanner.done else len(scanner.pending)
        last = self.produced - 1 - unshown  # the last token whose character was shown; -1: none
        if last < 0:
            return self.start
        for first, count, state in self.recent:
            if first <= last < first + count:
                return Context(*state(last - first))
        raise AssertionError("the context rewound past the chunks kept")  # the horizon rules this out


class Continuation:
    """Text sampled on from a :class:`Context`, piece by piece (iterate it).

    ``context`` is, at any moment, the context right after the text yielded so far,
    with a stop string left out, also when the reader stops early and closes it.
    ``finish_reason`` becomes ``"stop"`` (a stop string ended the text) or ``"length"``
    once the text is complete.
    """

    def __init__(self, run: _Run):
        self._run = run
        self._pieces = run.pieces()

    def __iter__(self) -> "Continuation":
        return self

    def __next__(self) -> str:
        return next(self._pieces)[1]

    def close(self) -> None:
        """Stop sampling; ``context`` stays right after the text that was yielded."""
        self._pieces.close()

    @property
    def context(self) -> Context:
        return self._run.context()

    @property
    def finish_reason(self) -> str | None:
        return self._run.finish_reason

    @property
    def config(self) -> SampleConfig:
        return self._run.config

    @property
    def logprobs(self) -> list[TokenLogprob]:
        """The log-probabilities of the characters yielded so far (sample with ``logprobs=K``)."""
        return self._run.logprobs()


@dataclass(frozen=True)
class Completion:
    """A continuation with what it is made of: ``logprobs`` per character when asked for."""

    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None

    @property
    def mean_logprob(self) -> float:
        """The mean log-probability of its characters (``-inf`` for an empty text); needs ``logprobs``."""
        if self.logprobs is None:
            raise RuntimeError("sampled without logprobs")
        return sum(t.logprob for t in self.logprobs) / len(self.logprobs) if self.logprobs else float("-inf")


@dataclass(frozen=True)
class Beam:
    """One result of a beam search: its text and total log-probability (nats) under the model."""

    text: str
    logprob: float


class Sampler:
    """A trained model ready to write: ``generate``, ``stream``, ``generate_many``, ``predict_next``,
    ``score``, ``chat``, and the continuation API (``read``, ``continue_from``)."""

    def __init__(
        self,
        model: CharRNN,
        tokenizer: CharTokenizer,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        max_prompt_chars: int = MAX_PROMPT_CHARS,
        kernel: bool = True,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.dtype = _precision(dtype)
        self.max_prompt_chars = max_prompt_chars
        # kernel=False keeps to torch ops: nothing is compiled (the trainer's preview text).
        self.kernel = kernel and self.device.type == "cpu"
        self._steppers: dict[tuple[str, torch.dtype, int], AnyStepper] = {}
        if self.kernel:
            load_kernel()  # built now (once per machine), not in the middle of the first reply

    def stepper(self, streams: int = 1) -> AnyStepper:
        """The step function for ``streams`` parallel streams, chosen by ``dtype``.

        - ``None`` (auto): on a CPU, fewer than 8 streams use the fused kernel with int8
          weights (reading the weights is the bottleneck, and int8 rows stay in cache);
          8 or more use bfloat16 products where the CPU runs them natively (AMX,
          AVX512-BF16), else float32. On CUDA: bfloat16 from 8 streams, else float32.
        - ``torch.float32``: exact (within 1e-5 of the model's forward pass).
        - ``torch.int8``: int8 weights, one scale per row; CPU only.
        - ``torch.bfloat16``: bfloat16 products, float32 state.

        On a CPU every choice runs on charrnn's compiled kernel (``charrnn.generation.native``),
        and on plain torch ops where it cannot be built. The rules are
        :func:`~charrnn.generation.stepper.choose_stepper`.
        """
        cpu = self.device.type == "cpu"
        kernel = load_kernel() if self.kernel else None
        fast_bf16 = cpu_has_fast_bf16() if cpu else self.device.type == "cuda"
        kind, dtype = choose_stepper(self.device.type, self.dtype, streams, kernel is not None, has_tiles(kernel), fast_bf16)
        # A batched stepper's weights are packed for its stream count: the count is part of its key.
        key = (kind, dtype, streams if kind == "batched" else 0)
        if key not in self._steppers:
            if kind == "fused":
                self._steppers[key] = NativeStepper(self.model, "int8" if dtype == torch.int8 else "float32", kernel)
            elif kind == "tiles":
                self._steppers[key] = NativeStepper(self.model, "bfloat16", kernel)
            elif kind == "batched":
                self._steppers[key] = BatchedStepper(self.model, dtype, kernel, streams)
            else:
                self._steppers[key] = Stepper(self.model, dtype)
        return self._steppers[key]

    @property
    def vocab(self) -> list[str]:
        return self.tokenizer.chars

    # -- feeding text ----------------------------------------------------------------
    def encode_prompt(self, text: str, allow_empty: bool = True, what: str = "the prompt", warn: bool = True) -> torch.Tensor:
        """Ids of ``text``, checked: bounded length, not made only of unknown characters.

        Unknown characters map to ``<unk>`` with a warning naming them (unless ``warn`` is
        False: a server tells its client instead). An empty text (where allowed) becomes a
        newline, the most neutral start a corpus has.
        """
        if len(text) > self.max_prompt_chars:
            raise PromptError(
                f"{what} has {len(text):,} characters; the limit is {self.max_prompt_chars:,}. A char-RNN "
                "remembers far less than that: pass the last part of the text, or raise max_prompt_chars"
            )
        if not text:
            if not allow_empty:
                raise PromptError("the text is empty: give at least one character")
            text = "\n" if "\n" in self.tokenizer else self.tokenizer.chars[1]
        unknown = self.tokenizer.check_known(text, what)
        if unknown and warn:
            warnings.warn(self.tokenizer.unknown_note(unknown), stacklevel=3)
        return torch.from_numpy(self.tokenizer.encode(text).astype(np.int64)).to(self.device)

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, hidden: State | None = None) -> tuple[torch.Tensor, State]:
        """Run ids (T,) through the model from ``hidden``: logits (1, V) after the last one, and the state."""
        logits = None
        for start in range(0, len(ids), _PRIME_CHUNK):
            out, hidden = self.model(ids[None, start : start + _PRIME_CHUNK], hidden)
            logits = out[:, -1].float()
        return logits, hidden

    # -- the continuation API -------------------------------------------------------------
    def read(self, text: str = "", context: Context | None = None, what: str = "the prompt", warn: bool = True) -> Context:
        """The context after reading ``text`` on from ``context`` (from the start when None).

        An empty ``text`` from the start reads as a newline; from a context it reads nothing.
        ``warn``: as :meth:`encode_prompt`.
        """
        if context is not None and not text:
            return context
        ids = self.encode_prompt(text, what=what, warn=warn)
        logits, hidden = self.feed(ids, None if context is None else context.hidden)
        return Context(logits, hidden)

    def continue_from(
        self,
        context: Context,
        config: SampleConfig | None = None,
        generator: torch.Generator | None = None,
        keep_context: bool = True,
        **options: Any,
    ) -> Continuation:
        """Sample on from ``context``: a :class:`Continuation` to iterate for the pieces,
        whose ``context`` is then the state right after the text shown.

        Options are a ``config`` or the fields of :class:`~charrnn.config.SampleConfig`
        (the second override the first). The random draws come from ``generator`` when
        given (a conversation keeps one across turns), else from the config's seed.
        ``keep_context=False`` saves keeping the states a rewind needs, where the
        context after the text is not wanted.
        """
        config = SampleConfig.from_options(config, **options)
        generator = generator if generator is not None else new_generator(config.seed)
        return Continuation(_Run(self, context, config, generator, keep_context))

    # -- text from a prompt ---------------------------------------------------------------
    def stream(self, prompt: str = "", **options: Any) -> Iterator[str]:
        """Yield the continuation of ``prompt`` piece by piece as it is sampled.

        Options are those of :class:`~charrnn.config.SampleConfig`: ``length``,
        ``temperature`` (0: greedy), ``top_k``, ``top_p``, ``seed``, ``stop``.
        """
        config = SampleConfig.from_options(**options)
        yield from self.continue_from(self.read(prompt), config, keep_context=False)

    def generate(self, prompt: str = "", **options: Any) -> str:
        """The continuation of ``prompt`` (without the prompt). Same options as :meth:`stream`."""
        return "".join(self.stream(prompt, **options))

    def complete(self, prompt: str = "", **options: Any) -> Completion:
        """The continuation of ``prompt`` as a :class:`Completion`: its text, why it ended, and with
        ``logprobs=K`` each character's log-probability and the K likeliest alternatives."""
        config = SampleConfig.from_options(**options)
        reply = self.continue_from(self.read(prompt), config, keep_context=False)
        text = "".join(reply)
        return Completion(text, reply.finish_reason, reply.logprobs if config.logprobs is not None else None)

    def generate_many(self, prompt: str = "", num_samples: int = 2, **options: Any) -> list[str]:
        """``num_samples`` continuations of ``prompt``, sampled side by side as one batch."""
        if not 1 <= num_samples <= MAX_SAMPLES:
            raise PromptError(f"num_samples must be from 1 to {MAX_SAMPLES:,}, got {num_samples}: ask for fewer at once")
        config = SampleConfig.from_options(**options)
        context = self.read(prompt).expand(num_samples)
        run = _Run(self, context, config, new_generator(config.seed), track=False)
        if not config.stop and not config.constrained:
            # Nothing to watch for: keep the ids as tensors and decode once at the end, instead
            # of handing out num_samples Python strings per character.
            chunks = [tokens for tokens, _ in run.chunks()]
            rows = torch.cat(chunks).T.tolist() if chunks else [[] for _ in range(num_samples)]
            return [self.tokenizer.decode(row) for row in rows]
        texts = [""] * num_samples
        for i, piece in run.pieces():
            texts[i] += piece
        return texts

    @torch.no_grad()
    def prompt_logprobs(self, text: str, top: int = 0) -> list[TokenLogprob | None]:
        """Each character of ``text`` with its log-probability given the ones before it, read as
        :meth:`score` reads it (so ``-mean`` of them is the score), and the ``top`` likeliest
        alternatives; the first character, with nothing before it, is None."""
        if not 0 <= top <= MAX_LOGPROBS:
            raise ConfigError(f"top must be from 0 to {MAX_LOGPROBS}, got {top}")
        ids = self.encode_prompt(text, allow_empty=False)
        out: list[TokenLogprob | None] = [None]
        decode = self.tokenizer.decode
        for start in range(0, len(ids) - 1, _PRIME_CHUNK):
            # Each chunk is read from the state the one before it left: one pass over the text.
            chunk = ids[start : start + _PRIME_CHUNK + 1]
            if start == 0:
                hidden = None
            logits, hidden = self.model(chunk[None, :-1], hidden)
            logprobs = torch.log_softmax(logits[0].double(), dim=-1)
            chosen = logprobs.gather(1, chunk[1:, None])[:, 0].tolist()
            values, alternatives = logprobs.topk(min(top, logprobs.size(-1)), dim=-1)
            for t, lp, vs, alts in zip(chunk[1:].tolist(), chosen, values.tolist(), alternatives.tolist()):
                out.append(TokenLogprob(decode((t,)), lp, tuple((decode((a,)), v) for a, v in zip(alts, vs))))
        return out

    @torch.no_grad()
    def beam_search(self, prompt: str = "", beam: int = 4, length: int = 100) -> list[Beam]:
        """The ``beam`` likeliest continuations of ``length`` characters that a beam search finds, best first.

        Each step keeps the ``beam`` likeliest texts of all those one character longer
        (ties: the earlier text and character first, as greedy's largest logit), so
        ``beam=1`` is greedy sampling exactly. Every result has ``length`` characters (a
        char-RNN has no end of text), so their log-probabilities compare as they are.
        Beam search finds likely text, which is often dull text: it is never the default.
        """
        if not 1 <= beam <= MAX_BEAM:
            raise ConfigError(f"beam must be from 1 to {MAX_BEAM}, got {beam}")
        if length < 0:
            raise ConfigError(f"length must be >= 0, got {length}")
        context = self.read(prompt)
        stepper = self.stepper(beam)
        logits, hidden = context.logits, context.hidden
        scores = torch.zeros(1, dtype=torch.float64)
        texts = torch.zeros(1, 0, dtype=torch.int64)
        for _ in range(length):
            candidates = (scores[:, None] + torch.log_softmax(logits.double(), dim=-1)).flatten()
            best = torch.sort(candidates, descending=True, stable=True).indices[:beam]
            rows, tokens = best // logits.size(-1), best % logits.size(-1)
            scores, texts = candidates[best], torch.cat([texts[rows], tokens[:, None]], dim=1)
            kept = rows.to(self.device)
            logits, hidden = stepper.step(tokens.to(self.device), hidden.map(lambda t, kept=kept: t[:, kept]))
        return [Beam(self.tokenizer.decode(row), score) for row, score in zip(texts.tolist(), scores.tolist())]

    @torch.no_grad()
    def predict_next(self, prompt: str, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` likeliest next characters after ``prompt`` with their probabilities."""
        logits, _ = self.feed(self.encode_prompt(prompt))
        probs = torch.softmax(logits[0], dim=-1)
        values, ids = torch.topk(probs, min(max(k, 1), probs.numel()))
        return [(self.tokenizer.decode((i,)), float(p)) for i, p in zip(ids.tolist(), values.tolist())]

    def score(
        self,
        text: str,
        stepped: bool = False,
        streams: int = 16,
        dynamic: bool = False,
        dynamic_lr: float = DYNAMIC_LR,
        what: str = "the prompt",
    ) -> float:
        """Mean nats per character of predicting each character of ``text`` from those before it.

        By default the model reads the text in float32, as training measures it. With
        ``stepped``, it is read one character at a time as ``streams`` segments side by
        side (each from a fresh state; the last few characters that fill no segment are
        not scored), through the step that sampling ``streams`` streams at once uses: the
        cost of a precision in nats is the difference of the two. With ``dtype`` auto,
        that step is the batch one; give ``dtype`` to measure a particular precision.

        With ``dynamic``, a copy of the weights keeps learning from the text as it reads it
        (dynamic evaluation, see :func:`~charrnn.evaluation.dynamic_evaluate`; SGD at
        ``dynamic_lr``): a different figure, reported apart from the static one.
        ``what`` names the text in an error (e.g. a file name).
        """
        ids = self.encode_prompt(text, allow_empty=False, what=what).cpu().numpy()
        if len(ids) < 2:
            raise PromptError(
                f"{what} is too short to score: it needs at least two characters (the first has nothing to be predicted from)"
            )
        if dynamic:
            return dynamic_evaluate(self.model, ids, self.device, lr=dynamic_lr)
        if not stepped:
            return evaluate(self.model, ids, self.device, columns=1)
        streams = max(1, min(streams, (len(ids) - 1) // 2))
        per = (len(ids) - 1) // streams
        x = torch.from_numpy(np.stack([ids[i * per : i * per + per + 1] for i in range(streams)]).astype(np.int64)).to(
            self.device
        )
        stepper, hidden, total = self.stepper(streams), self.model.init_hidden(streams), torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for t in range(per):
                logits, hidden = stepper.step(x[:, t], hidden)
                total += torch.nn.functional.cross_entropy(logits, x[:, t + 1], reduction="sum").double().cpu()
        return float(total) / (per * streams)

    def chat(self, seed: int | None = None, **options: Any) -> ChatSession:
        """A new :class:`~charrnn.generation.chat.ChatSession` over this model.

        ``options`` are its sampling options and, optionally, ``template`` and ``preamble``.
        """
        return ChatSession(self, seed=seed, **options)


def _precision(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A sampling precision given as a dtype, a name from ``PRECISIONS``, or None (auto)."""
    if isinstance(dtype, str):
        if dtype not in PRECISIONS:
            raise ConfigError(f"unknown precision {dtype!r}: choose one of {', '.join(PRECISIONS)}")
        return PRECISIONS[dtype]
    if dtype is not None and dtype not in PRECISIONS.values():
        raise ConfigError(f"sampling runs in float32, bfloat16 or int8, not {dtype}")
    return dtype


def load(
    path: str | Path | None = None,
    device: str = "auto",
    dtype: torch.dtype | str | None = None,
) -> Sampler:
    """Load a checkpoint (default: the newest best under ``checkpoints/``) as a :class:`Sampler`.

    ``path`` is a run folder, its ``best`` / ``last``, or ``hf:OWNER/NAME[@REVISION]`` for a
    model on the Hugging Face Hub (downloaded once into the Hub's cache, then found offline).

    ``dtype`` is the precision of a sampling step (see :meth:`Sampler.stepper`): None or
    "auto", or float32, bfloat16, int8 (as a torch dtype or its name).
    """
    resolved = resolve_device(device)
    ckpt = load_checkpoint(path if path is not None else find_latest_checkpoint(), resolved)
    return Sampler(ckpt.model, ckpt.tokenizer, resolved, dtype)


def preview_text(model: CharRNN, tokenizer: CharTokenizer, device: torch.device, length: int, seed: int) -> str:
    """A sample to look at a model while it trains: on torch ops, so nothing is compiled mid-run."""
    return Sampler(model, tokenizer, device, kernel=False).generate("\n", length=length, temperature=0.8, seed=seed)

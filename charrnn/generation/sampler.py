"""Sampling: logits processors, generate, stream, predict_next, score (chat: ``charrnn.chat``).

Everything here carries the hidden state forward one character at a time over the
pre-packed :class:`~charrnn.stepper.Stepper`; nothing re-reads a prefix. Each call
draws from its own ``torch.Generator``, so the same seed gives the same text, and
threads can share one :class:`Sampler`.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .checkpoint import find_latest_checkpoint, load_checkpoint
from .config import SampleConfig
from .device import cpu_has_fast_bf16, resolve_device
from .errors import ConfigError, PromptError
from .evaluation import evaluate
from .model import CharRNN, Hidden
from .native import BatchedStepper, NativeStepper, has_tiles, load_kernel
from .stepper import StateAfter, Stepper, run_steps
from .tokenizer import CharTokenizer

if TYPE_CHECKING:
    from .chat import ChatSession

MAX_PROMPT_CHARS = 100_000
MAX_SAMPLES = 4096  # streams sampled side by side in one call
BATCH_STREAMS = 8  # from this many streams on, products run as batched matrix products
PRECISIONS = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
_PRIME_CHUNK = 2048
_SAMPLE_CHUNK = 64  # characters sampled per call before the text is scanned for stop strings


# --- logits processors ------------------------------------------------------------------


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th kept), -inf elsewhere."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of likeliest characters whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # ties: as the kernel
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a character if the ones before it already reach p; the first always stays.
    drop = (torch.cumsum(probs, dim=-1) - probs) >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def pick_next(logits: torch.Tensor, config: SampleConfig, uniforms: torch.Tensor) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V) under temperature, top-k and top-p.

    Each row draws by inverse CDF with its own uniform in [0, 1) (``uniforms``, (B,)):
    the first character whose cumulative probability, in vocabulary order, exceeds
    u times the total. The fused kernel applies the same rule, so a seed means the
    same uniforms on every path.
    """
    if config.greedy:
        return logits.argmax(dim=-1)
    wide = torch.float32 if logits.device.type == "mps" else torch.float64  # MPS has no float64
    logits = apply_top_p(apply_top_k(logits.to(wide) / config.temperature, config.top_k), config.top_p)
    probs = torch.softmax(logits, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    picked = (cdf <= uniforms.to(cdf)[:, None] * cdf[:, -1:]).sum(dim=-1)
    # Rounding can leave the target at the very top: take the last character still allowed.
    last = probs.size(-1) - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(picked, last)


def sample_steps(
    stepper: Stepper | NativeStepper | BatchedStepper,
    logits: torch.Tensor,
    hidden: Hidden,
    config: SampleConfig,
    uniforms: torch.Tensor,
    every_state: bool = True,
) -> tuple[torch.Tensor, StateAfter]:
    """K characters for B streams from the state before them, one uniform each (``uniforms``, (K, B)).

    Returns the tokens (K, B) and ``state(j)``: the logits and hidden state right after
    token j, so a caller can stop after any of them. Without ``every_state`` only the
    state after the last token need be kept.
    """
    if not isinstance(stepper, Stepper):  # the kernel's steppers pick in the kernel (temperature 0: greedy)
        return stepper.sample(logits, hidden, uniforms, config.temperature, config.top_k, config.top_p, every_state)
    return run_steps(stepper.step, lambda logits, u: pick_next(logits, config, u), logits, hidden, uniforms, every_state)


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator from ``seed``, or from fresh OS entropy when it is None."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(seed)


# --- stop strings -------------------------------------------------------------------------


class StopScanner:
    """Releases generated text as soon as it cannot be the start of a stop string.

    ``push`` returns the text that is safe to show now; text that might begin a stop
    string is held back until it is clear. Once a stop string appears, ``done`` is set
    and the text before it is returned; the stop string itself is never returned.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""
        self.done = False
        self.stop_length = 0  # characters of the stop string that ended the text

    def push(self, text: str) -> str:
        self.pending += text
        matches = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if matches:
            start = min(matches)[0]
            # A match is seen the moment it completes, so everything from `start` on is the stop string.
            out, self.stop_length = self.pending[:start], len(self.pending) - start
            self.done, self.pending = True, ""
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# --- the sampler ---------------------------------------------------------------------------


class Sampler:
    """A trained model ready to write: ``generate``, ``stream``, ``predict_next``, ``score``, chat."""

    def __init__(
        self,
        model: CharRNN,
        tokenizer: CharTokenizer,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        max_prompt_chars: int = MAX_PROMPT_CHARS,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.dtype = _precision(dtype)
        self.max_prompt_chars = max_prompt_chars
        self._steppers: dict[tuple[str, torch.dtype], Stepper | NativeStepper | BatchedStepper] = {}
        if self.device.type == "cpu":
            load_kernel()  # built now (once per machine), not in the middle of the first reply

    def stepper(self, streams: int = 1) -> Stepper | NativeStepper | BatchedStepper:
        """The step function for ``streams`` parallel streams, chosen by ``dtype``.

        - ``None`` (auto): on a CPU, fewer than 8 streams use the fused kernel with int8
          weights (reading the weights is the bottleneck, and int8 rows stay in cache);
          8 or more use bfloat16 products where the CPU runs them natively (AMX,
          AVX512-BF16), else float32. On CUDA: bfloat16 from 8 streams, else float32.
        - ``torch.float32``: exact (within 1e-5 of the model's forward pass).
        - ``torch.int8``: int8 weights, one scale per row; CPU only.
        - ``torch.bfloat16``: bfloat16 products, float32 state.

        On a CPU every choice runs on charrnn's compiled kernel (``charrnn.native``), and
        on plain torch ops where it cannot be built.
        """
        cpu = self.device.type == "cpu"
        kernel = load_kernel() if cpu else None
        batch = streams >= BATCH_STREAMS
        dtype = self.dtype
        if dtype is None:
            if kernel is not None and not batch:
                dtype = torch.int8
            else:
                fast_bf16 = cpu_has_fast_bf16() if cpu else self.device.type == "cuda"
                dtype = torch.bfloat16 if batch and fast_bf16 else torch.float32
        if dtype == torch.int8 and kernel is None:
            where = "on this machine" if cpu else f"on {self.device.type}"
            raise ConfigError(f"int8 sampling runs on charrnn's CPU kernel, which is not available {where}: use float32 or bfloat16")
        kind = "torch" if kernel is None else "fused" if dtype == torch.int8 or (dtype == torch.float32 and not batch) else "batched"
        key = (kind, dtype)
        if key not in self._steppers:
            if kind == "fused":
                self._steppers[key] = NativeStepper(self.model, "int8" if dtype == torch.int8 else "float32", kernel)
            elif kind == "batched" and dtype == torch.bfloat16 and has_tiles(kernel):
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
    def encode_prompt(self, text: str, allow_empty: bool = True) -> torch.Tensor:
        """Ids of ``text``, checked: bounded length, not made only of unknown characters.

        Unknown characters map to ``<unk>`` with a warning naming them. An empty text
        (where allowed) becomes a newline, the most neutral start a corpus has.
        """
        if len(text) > self.max_prompt_chars:
            raise PromptError(
                f"the prompt has {len(text):,} characters; the limit is {self.max_prompt_chars:,}. A char-RNN "
                "remembers far less than that: pass the last part of the text, or raise max_prompt_chars"
            )
        if not text:
            if not allow_empty:
                raise PromptError("the text is empty: give at least one character")
            text = "\n" if "\n" in self.tokenizer else self.tokenizer.chars[1]
        unknown = self.tokenizer.unknown_chars(text)
        if unknown:
            if len(unknown) == len(set(text)):
                raise PromptError(
                    f"the prompt is made only of characters the model never saw ({''.join(unknown[:20])!r}): "
                    "write it with characters of the training corpus"
                )
            warnings.warn(
                f"the model never saw {''.join(unknown[:20])!r}; those characters are read as <unk>",
                stacklevel=3,
            )
        return torch.from_numpy(self.tokenizer.encode(text).astype(np.int64)).to(self.device)

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, hidden: Hidden | None = None) -> tuple[torch.Tensor, Hidden]:
        """Run ids (T,) through the model from ``hidden``: logits (1, V) after the last one, and the state."""
        logits = None
        for start in range(0, len(ids), _PRIME_CHUNK):
            out, hidden = self.model(ids[None, start : start + _PRIME_CHUNK], hidden)
            logits = out[:, -1].float()
        return logits, hidden

    # -- the generation loop ------------------------------------------------------------
    @torch.no_grad()
    def _chunks(
        self,
        stepper: Stepper | NativeStepper | BatchedStepper,
        logits: torch.Tensor,
        hidden: Hidden,
        config: SampleConfig,
        generator: torch.Generator,
        every_state: bool,
    ) -> Iterator[tuple[torch.Tensor, StateAfter]]:
        """``config.length`` characters for len(logits) streams, as (tokens, state) chunks of
        ``sample_steps``; the uniforms come from ``generator`` in order, so the text does
        not depend on the chunk size."""
        for produced in range(0, config.length, _SAMPLE_CHUNK):
            count = min(_SAMPLE_CHUNK, config.length - produced)
            uniforms = torch.rand(count, logits.size(0), generator=generator, dtype=torch.float64)
            tokens, state = sample_steps(stepper, logits, hidden, config, uniforms, every_state)
            logits, hidden = state(count - 1)
            yield tokens, state

    @torch.no_grad()
    def _run(
        self,
        logits: torch.Tensor,
        hidden: Hidden,
        config: SampleConfig,
        generator: torch.Generator,
        end: dict[str, Any] | None = None,
    ) -> Iterator[tuple[int, str]]:
        """Yield (stream index, text) pieces for len(logits) streams from the given state.

        With one stream, ``end`` receives the logits and hidden state right after the
        returned text (the stop string excluded), so a chat can continue from there.
        """
        streams = logits.size(0)
        stepper = self.stepper(streams)
        scanners = [StopScanner(config.stop) for _ in range(streams)]
        active = set(range(streams))
        # The state after each recent character (the first entry: the state before them all),
        # to rewind to the end of the shown text.
        start = (logits, hidden)
        history: deque = deque([lambda: start], maxlen=max((len(s) for s in config.stop), default=0) + 1)
        decode = self.tokenizer.decode
        try:
            # Rewinding into a chunk is only needed to leave a chat where its text ended.
            for tokens, state in self._chunks(stepper, logits, hidden, config, generator, every_state=end is not None):
                for j, ids in enumerate(tokens.tolist()):
                    if end is not None:
                        history.append(lambda j=j, state=state: state(j))
                    for i in sorted(active):
                        piece = scanners[i].push(decode((ids[i],)))
                        if piece:
                            yield i, piece
                        if scanners[i].done:
                            active.discard(i)
                    if not active:
                        return
            for i in sorted(active):
                piece = scanners[i].flush()
                if piece:
                    yield i, piece
        finally:
            # Also when the caller stops reading early: the state then matches what it was shown.
            if end is not None:
                scanner = scanners[0]
                unshown = scanner.stop_length if scanner.done else len(scanner.pending)
                end["logits"], end["hidden"] = history[-1 - unshown]()

    def _config(self, **options: Any) -> SampleConfig:
        if isinstance(options.get("stop"), str):
            options["stop"] = (options["stop"],)
        elif options.get("stop") is not None:
            options["stop"] = tuple(options["stop"])
        return SampleConfig(**{k: v for k, v in options.items() if v is not None})

    # -- the public API -------------------------------------------------------------------
    def stream(self, prompt: str = "", **options: Any) -> Iterator[str]:
        """Yield the continuation of ``prompt`` piece by piece as it is sampled.

        Options are those of :class:`~charrnn.config.SampleConfig`: ``length``,
        ``temperature`` (0: greedy), ``top_k``, ``top_p``, ``seed``, ``stop``.
        """
        config = self._config(**options)
        logits, hidden = self.feed(self.encode_prompt(prompt))
        for _, piece in self._run(logits, hidden, config, new_generator(config.seed)):
            yield piece

    def generate(self, prompt: str = "", **options: Any) -> str:
        """The continuation of ``prompt`` (without the prompt). Same options as :meth:`stream`."""
        return "".join(self.stream(prompt, **options))

    def generate_many(self, prompt: str = "", num_samples: int = 2, **options: Any) -> list[str]:
        """``num_samples`` continuations of ``prompt``, sampled side by side as one batch."""
        if not 1 <= num_samples <= MAX_SAMPLES:
            raise PromptError(f"num_samples must be from 1 to {MAX_SAMPLES:,}, got {num_samples}: ask for fewer at once")
        config = self._config(**options)
        logits, hidden = self.feed(self.encode_prompt(prompt))
        logits = logits.expand(num_samples, -1)
        hidden = tuple(h.expand(-1, num_samples, -1) for h in hidden) if isinstance(hidden, tuple) else hidden.expand(-1, num_samples, -1)
        generator = new_generator(config.seed)
        if not config.stop:
            # Nothing to watch for: keep the ids as tensors and decode once at the end, instead
            # of handing out num_samples Python strings per character.
            stepper = self.stepper(num_samples)
            chunks = [tokens for tokens, _ in self._chunks(stepper, logits, hidden, config, generator, every_state=False)]
            rows = torch.cat(chunks).T.tolist() if chunks else [[] for _ in range(num_samples)]
            return [self.tokenizer.decode(row) for row in rows]
        texts = [""] * num_samples
        for i, piece in self._run(logits, hidden, config, generator):
            texts[i] += piece
        return texts

    @torch.no_grad()
    def predict_next(self, prompt: str, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` likeliest next characters after ``prompt`` with their probabilities."""
        logits, _ = self.feed(self.encode_prompt(prompt))
        probs = torch.softmax(logits[0], dim=-1)
        values, ids = torch.topk(probs, min(max(k, 1), probs.numel()))
        return [(self.tokenizer.decode((i,)), float(p)) for i, p in zip(ids.tolist(), values.tolist())]

    def score(self, text: str, stepped: bool = False, streams: int = 16) -> float:
        """Mean nats per character of predicting each character of ``text`` from those before it.

        By default the model reads the text in float32, as training measures it. With
        ``stepped``, it is read one character at a time as ``streams`` segments side by
        side (each from a fresh state; the last few characters that fill no segment are
        not scored), through the step that sampling ``streams`` streams at once uses: the
        cost of a precision in nats is the difference of the two. With ``dtype`` auto,
        that step is the batch one; give ``dtype`` to measure a particular precision.
        """
        ids = self.encode_prompt(text, allow_empty=False).cpu().numpy()
        if len(ids) < 2:
            raise PromptError("score needs at least two characters: the first one has nothing to be predicted from")
        if not stepped:
            return evaluate(self.model, ids, self.device, columns=1)
        streams = max(1, min(streams, (len(ids) - 1) // 2))
        per = (len(ids) - 1) // streams
        x = torch.from_numpy(np.stack([ids[i * per : i * per + per + 1] for i in range(streams)]).astype(np.int64)).to(self.device)
        stepper, hidden, total = self.stepper(streams), self.model.init_hidden(streams), torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for t in range(per):
                logits, hidden = stepper.step(x[:, t], hidden)
                total += torch.nn.functional.cross_entropy(logits, x[:, t + 1], reduction="sum").double().cpu()
        return float(total) / (per * streams)

    def chat(self, seed: int | None = None, **options: Any) -> "ChatSession":
        """A new :class:`~charrnn.chat.ChatSession` over this model.

        ``options`` are its sampling options and, optionally, ``template`` and ``preamble``.
        """
        from .chat import ChatSession  # chat builds on this module: imported here, not at the top

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

    ``dtype`` is the precision of a sampling step (see :meth:`Sampler.stepper`): None or
    "auto", or float32, bfloat16, int8 (as a torch dtype or its name).
    """
    resolved = resolve_device(device)
    ckpt = load_checkpoint(path if path is not None else find_latest_checkpoint(), resolved)
    return Sampler(ckpt.model, ckpt.tokenizer, resolved, dtype)


def __getattr__(name: str) -> Any:
    # ChatSession used to live here; it moved to charrnn.chat, which imports this module.
    if name == "ChatSession":
        from .chat import ChatSession

        return ChatSession
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Chat: a conversation held in one hidden state, and the template that writes its turns.

A char-RNN has no notion of turns; it only continues text. A :class:`ChatTemplate`
writes each turn the way the training corpus writes dialogue (by default a play
script, as in Tiny Shakespeare)::

    ROMEO:\\n<your message>\\n\\nJULIET:\\n<the model's reply>\\n\\nROMEO:\\n...

and the reply ends where the model starts the next turn (the turn separator), which is
never shown. The session's whole memory is the hidden state after the text shown so
far, so every turn costs only its own characters, however long the conversation.

``charrnn chat --checkpoint RUN`` is the terminal front end (``charrnn.cli.chat``);
:meth:`ChatSession.save` / :meth:`ChatSession.load` let a conversation survive a restart.
"""

from __future__ import annotations

import hashlib
import json
import struct
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .._io import atomic_write, parse_json, read_bytes
from .._version import __version__
from ..config import SampleConfig, check_seed
from ..errors import CharRNNError, ConfigError, PromptError, SessionFileError
from ..model import CELL_TABLE, State
from .processors import new_generator
from .stepper import Context

if TYPE_CHECKING:
    from ..tokenizer import CharTokenizer
    from .sampler import Sampler

SESSION_FORMAT = "charrnn-chat-session"
SESSION_VERSION = 1
_METADATA_KEY = "charrnn_chat"
# A session file holds a few hidden-state tensors and a preamble (at most 100,000
# characters): anything near this size is not one of ours, so it is refused unread.
MAX_SESSION_FILE_BYTES = 64 * 1024 * 1024


# --- the turn template ----------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplate:
    """How a turn is written into the text the model reads.

    A user turn is read as ``user_prefix + message + turn_separator + bot_prefix``; the
    model then writes its reply, which ends at a stop string (by default the turn
    separator: wherever the model starts a new turn, its own or another speaker's).
    Before a turn, the conversation so far is completed to end with the separator.

    The defaults are a play script, the shape of dialogue in Tiny Shakespeare: you are
    ROMEO, the model is JULIET, and speeches are separated by a blank line.
    """

    user_prefix: str = field(default="ROMEO:\n", metadata={"help": "written before each of your messages"})
    bot_prefix: str = field(default="JULIET:\n", metadata={"help": "written before each reply; the model goes on from here"})
    turn_separator: str = field(default="\n\n", metadata={"help": "ends every turn; also the default stop string of a reply"})

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), str):
                raise ConfigError(f"ChatTemplate.{f.name} must be a string, got {getattr(self, f.name)!r}")

    @property
    def stops(self) -> tuple[str, ...]:
        """Where a reply ends by default: the turn separator, else the start of the user's turn."""
        stop = self.turn_separator or self.user_prefix
        return (stop,) if stop else ()

    def separator_after(self, tail: str) -> str:
        """What a text ending in ``tail`` still needs to end with the turn separator ("" at the start)."""
        return _missing_separator(tail, self.turn_separator)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def check_vocabulary(self, tokenizer: "CharTokenizer") -> None:
        """ConfigError if the prefixes or the separator hold characters the model never saw.

        Checked once, where a template meets a model (a chat session, the server): an
        unknown character would be read as ``<unk>`` in every turn, so the model would
        never see the turns the template means to write.
        """
        unknown = tokenizer.unknown_chars("".join(self.to_dict().values()))
        if unknown:
            raise ConfigError(
                f"the chat template uses characters the model never saw ({''.join(unknown)!r}): "
                "write its prefixes and separator with characters of the training corpus"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ChatTemplate":
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown ChatTemplate fields {sorted(unknown)}")
        return cls(**values)


def _missing_separator(tail: str, separator: str) -> str:
    """What to append to text ending in ``tail`` so that it ends with ``separator``.

    Nothing at the very start of a conversation; only the rest of the separator when the
    text already ends with its beginning (a reply cut at "\\n" gets one more "\\n").
    """
    if not tail or not separator:
        return ""
    for k in range(len(separator), 0, -1):
        if tail.endswith(separator[:k]):
            return separator[k:]
    return separator


# --- the model's fingerprint -------------------------------------------------------------------

_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def model_fingerprint(sampler: "Sampler") -> str:
    """sha256 of the model's config, vocabulary and weights: what a saved session belongs to.

    Hashed from the loaded model rather than from the checkpoint's files, so it needs no
    path and is the same for every copy of a checkpoint. Cached per model (a 2x512 LSTM
    takes about 30 ms to hash).
    """
    model = sampler.model
    cached = _FINGERPRINTS.get(model)
    if cached is None:
        digest = hashlib.sha256()
        digest.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
        digest.update(json.dumps(sampler.tokenizer.chars).encode())
        for name, tensor in sorted(model.state_dict().items()):
            array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
            digest.update(f"{name}{tuple(array.shape)}".encode())
            digest.update(memoryview(array).cast("B"))
        cached = _FINGERPRINTS[model] = digest.hexdigest()
    return cached


# --- the session --------------------------------------------------------------------------------


class ChatSession:
    """A conversation whose whole memory is one hidden state.

    ``send(text)`` reads ``text`` on from where the conversation stands and returns the
    model's reply, which also becomes part of the conversation. Each turn costs only its
    own characters: the history is never re-read, and nothing grows with it.

    Without a template (the default of ``Sampler.chat()``), ``text`` is read verbatim.
    With a :class:`ChatTemplate`, ``text`` is your message and is written into a turn;
    the reply stops at the template's stop strings unless ``stop`` is given.

    Options are those of :class:`~charrnn.config.SampleConfig`; ``length`` is the
    maximum reply length in characters. A session made with a seed repeats its
    conversation exactly, also across :meth:`save` and :meth:`load`. The ``preamble``
    (a "system" text) is read once, before the first turn and again after :meth:`reset`.
    """

    def __init__(
        self,
        sampler: "Sampler",
        seed: int | None = None,
        *,
        template: ChatTemplate | None = None,
        preamble: str = "",
        **options: Any,
    ):
        if template is not None and not isinstance(template, ChatTemplate):
            raise ConfigError(f"template must be a ChatTemplate or None, got {template!r}")
        if not isinstance(preamble, str):
            raise ConfigError(f"preamble must be a string, got {preamble!r}")
        check_seed(seed, "seed")
        self.sampler = sampler
        self.template = template
        self.preamble = preamble
        self._seed = seed
        if template is not None:
            if options.get("stop") is None:  # the reply ends where the model begins a new turn
                options["stop"] = template.stops
            template.check_vocabulary(sampler.tokenizer)
        self.config = self._merged(options)
        # The context right after the preamble, where reset() returns to (None: nothing read).
        self._start: Context | None = sampler.read(preamble) if preamble else None
        self.reset()

    # -- options ------------------------------------------------------------------------
    def _merged(self, options: dict[str, Any], base: SampleConfig | None = None) -> SampleConfig:
        if "seed" in options:
            raise ConfigError("a chat session's seed is set when it is made: sampler.chat(seed=...)")
        return SampleConfig.from_options(base, **options)

    def configure(self, **options: Any) -> None:
        """Change the reply options from now on (e.g. ``temperature=0.7``); checked first."""
        self.config = self._merged(options, self.config)

    @property
    def seed(self) -> int | None:
        return self._seed

    # -- the conversation -------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation: back to just after the preamble, the random stream restarted from the seed."""
        self._generator = new_generator(self._seed)
        self._context: Context | None = self._start
        # The last characters read, to complete the text with the turn separator (bounded by its length).
        self._tail = self._keep_tail("", self.preamble)
        self.turns = 0

    def _keep_tail(self, tail: str, text: str) -> str:
        n = len(self.template.turn_separator) if self.template is not None else 0
        return (tail + text[-n:])[-n:] if n else ""

    def feed(self, text: str) -> None:
        """Read ``text`` verbatim into the conversation without replying."""
        if text:
            self._read(text)

    def _read(self, text: str) -> None:
        self._context = self.sampler.read(text, self._context)
        self._tail = self._keep_tail(self._tail, text)

    def turn_text(self, message: str) -> str:
        """The text a templated turn reads for ``message`` from where the conversation stands."""
        if self.template is None:
            return message
        t = self.template
        return _missing_separator(self._tail, t.turn_separator) + t.user_prefix + message + t.turn_separator + t.bot_prefix

    def _check_message(self, text: str) -> None:
        if not isinstance(text, str):
            raise PromptError(f"a message must be a string, got {type(text).__name__}")
        if self.template is None:
            return  # read verbatim: encode_prompt checks it
        limit = self.sampler.max_prompt_chars
        if len(text) > limit:  # checked before the turn text copies it
            raise PromptError(f"the message has {len(text):,} characters; the limit is {limit:,}: send a shorter one")
        self.sampler.tokenizer.check_known(text, "the message")

    def stream(self, text: str = "", **options: Any) -> Iterator[str]:
        """Read ``text`` (a message, with a template), then yield the reply piece by piece.

        If you stop reading early, the session stands right after the pieces you got.
        """
        config = self._merged(options, self.config)
        self._check_message(text)
        turn = self.turn_text(text)
        if turn:
            self._read(turn)
        if self._context is None:  # nothing read yet: start as a prompt-less sample would
            self._context = self.sampler.read("")
        reply = self.sampler.continue_from(self._context, config, generator=self._generator)
        try:
            for piece in reply:
                self._tail = self._keep_tail(self._tail, piece)
                yield piece
        finally:
            # Also when the reader stops early: the context is then right after the pieces shown.
            reply.close()
            self._context = reply.context
            self.turns += 1

    def send(self, text: str = "", **options: Any) -> str:
        """Read ``text`` (a message, with a template) and return the model's reply."""
        return "".join(self.stream(text, **options))

    # -- saving and loading -----------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the session keeps (what :meth:`save` writes): its size never depends on the turns."""
        tensors: dict[str, torch.Tensor] = {"generator": self._generator.get_state()}
        for prefix, context in (("", self._context), ("start_", self._start)):
            if context is None:
                continue
            tensors[prefix + "logits"] = context.logits
            tensors.update({prefix + name: t for name, t in context.hidden.named().items()})  # h, and c for an LSTM
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def save(self, path: str | Path) -> Path:
        """Write the session (state, random stream, template, options) to ``path`` atomically.

        The file is safetensors with a JSON header: no pickle, nothing that runs code.
        """
        path = Path(path).expanduser()
        meta = {
            "format": SESSION_FORMAT,
            "version": SESSION_VERSION,
            "charrnn": __version__,
            "fingerprint": model_fingerprint(self.sampler),
            "template": self.template.to_dict() if self.template is not None else None,
            "preamble": self.preamble,
            "options": {k: (list(v) if k == "stop" else v) for k, v in asdict(self.config).items() if k != "seed"},
            "seed": self._seed,
            "tail": self._tail,
            "turns": self.turns,
        }
        tensors = self.state_tensors()
        meta["sha256"] = _tensors_sha256(tensors)  # safetensors has no checksum of its own
        data = save_safetensors_bytes(tensors, metadata={_METADATA_KEY: json.dumps(meta)})
        try:
            with atomic_write(path) as f:  # a crash leaves the previous file whole
                f.write(data)
        except OSError as exc:
            raise SessionFileError(f"could not save the chat session to {path}: {exc.strerror or exc}") from None
        return path

    @classmethod
    def load(cls, sampler: "Sampler", path: str | Path) -> "ChatSession":
        """A session saved by :meth:`save`, resumed over ``sampler`` (which must hold the same model)."""
        path = Path(path).expanduser()
        meta, tensors = _read_session_file(path)
        if meta.get("fingerprint") != model_fingerprint(sampler):
            raise SessionFileError(
                f"{path} was saved from another model (fingerprint {str(meta.get('fingerprint'))[:12]}..., this "
                f"model's is {model_fingerprint(sampler)[:12]}...): load it with the checkpoint it was saved with"
            )
        damaged = f"{path} is damaged"
        try:
            template = ChatTemplate.from_dict(meta["template"]) if meta["template"] is not None else None
            # Made without its preamble, which is not read again: the saved start state stands for it.
            session = cls(sampler, meta["seed"], template=template, **dict(meta["options"]))
            preamble, tail, turns = meta["preamble"], meta["tail"], meta["turns"]
            if not isinstance(preamble, str) or not isinstance(tail, str) or not isinstance(turns, int) or turns < 0:
                raise ValueError("bad preamble, tail or turn count")
        except (KeyError, TypeError, ValueError, CharRNNError) as exc:
            raise SessionFileError(f"{damaged}: its settings do not load ({exc})") from None
        session.preamble = preamble
        session._restore(tensors, damaged)
        session._tail, session.turns = tail, turns
        return session

    def _restore(self, tensors: dict[str, torch.Tensor], damaged: str) -> None:
        cfg = self.sampler.model.config
        hidden_shape = (cfg.n_layers, 1, cfg.hidden_size)
        names = CELL_TABLE[cfg.cell].state_names
        device = self.sampler.device

        def state(prefix: str) -> Context | None:
            keys = [prefix + "logits"] + [prefix + n for n in names]
            if not any(k in tensors for k in keys):
                return None
            shapes = {prefix + "logits": (1, cfg.vocab_size), **{prefix + n: hidden_shape for n in names}}
            for k, shape in shapes.items():
                t = tensors.get(k)
                if t is None or tuple(t.shape) != shape or t.dtype != torch.float32 or not torch.isfinite(t).all():
                    raise SessionFileError(f"{damaged}: tensor {k!r} is missing or is not a finite float32 {shape}")
            hidden = State.from_tensors([tensors[prefix + n] for n in names]).to(device)
            return Context(tensors[prefix + "logits"].to(device), hidden)

        start, now = state("start_"), state("")
        if (start is None) != (not self.preamble):
            raise SessionFileError(f"{damaged}: its preamble and its saved start state disagree")
        generator = tensors.get("generator")
        try:
            if generator is None:
                raise RuntimeError("no generator state")
            self._generator.set_state(generator)
        except (RuntimeError, TypeError) as exc:
            raise SessionFileError(f"{damaged}: its random state does not load ({exc})") from None
        # The start state is the one saved, not the preamble re-read: reset() then matches the original exactly.
        self._start = start
        self._context = now


def _read_session_file(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON metadata and the tensors of a session file; any damage is a SessionFileError."""
    try:
        data = read_bytes(path, MAX_SESSION_FILE_BYTES)
    except FileNotFoundError:
        raise SessionFileError(f"{path} not found: give the file a session was saved to") from None
    except OSError as exc:
        raise SessionFileError(f"cannot read {path}: {exc.strerror or exc}; give the file a session was saved to") from None
    not_ours = f"{path} is not a charrnn chat session (or it is damaged)"
    # safetensors layout: u64 little-endian header length, then the JSON header.
    if len(data) < 8:
        raise SessionFileError(not_ours)
    (header_len,) = struct.unpack("<Q", data[:8])
    try:
        header = parse_json(data[8 : 8 + header_len]) if 8 + header_len <= len(data) else None
        meta = parse_json(header["__metadata__"][_METADATA_KEY])
    except (ValueError, RecursionError, KeyError, TypeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SessionFileError(not_ours) from None
    if not isinstance(meta, dict) or meta.get("format") != SESSION_FORMAT:
        raise SessionFileError(not_ours)
    if meta.get("version") != SESSION_VERSION:
        raise SessionFileError(
            f"{path} is a chat session of format version {meta.get('version')!r}; this charrnn reads version {SESSION_VERSION}"
        )
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise SessionFileError(f"{path} is damaged: its tensors do not load ({exc})") from None
    if meta.get("sha256") != _tensors_sha256(tensors):
        raise SessionFileError(f"{path} is damaged: its tensors do not match their recorded sha256")
    return meta, tensors


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()

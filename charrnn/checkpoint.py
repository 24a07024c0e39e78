"""Checkpoint directories: written atomically, loaded without running any code.

A checkpoint is a directory::

    config.json              model config, training arguments, step, best val loss,
                             versions, and the sha256 of every other file
    model.safetensors        the weights
    tokenizer.json           the character vocabulary (Hugging Face tokenizers format)
    training_state.safetensors + training_state.json
                             (``last`` only) optimizer moments, RNG states, the hidden
                             state of the batch streams: what an exact resume needs

Saving writes everything into a hidden temporary directory beside the target, fsyncs
it, then swaps it into place with two renames. If the process dies between them, the
previous checkpoint is still whole under ``.NAME.old`` and :func:`resolve_checkpoint`
finds it there. Loading reads JSON and safetensors only (never pickle), checks every
file against its recorded sha256, and turns any damage into a ``CheckpointError`` that
names the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from ._io import MAX_JSON_BYTES, FolderBusyError, folder_lock, fsync_dir, parse_json, read_bytes, write_file
from ._version import __version__
from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .hub import download_checkpoint, is_hub_name
from .model import CharRNN
from .tokenizer import CharTokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
STATE_TENSORS_FILE = "training_state.safetensors"
STATE_JSON_FILE = "training_state.json"
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, STATE_TENSORS_FILE, STATE_JSON_FILE)  # all there may be
FORMAT_VERSION = 1
# Read bounds, enforced while reading: JSON files are a few KB; weights are bounded well
# above any model a machine here trains (a 4x4096 LSTM is 2.2 GB), far below "read /dev/zero".
MAX_TENSOR_FILE_BYTES = 64 << 30
_READ_LIMITS = {STATE_TENSORS_FILE: MAX_TENSOR_FILE_BYTES, WEIGHTS_FILE: MAX_TENSOR_FILE_BYTES}
_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle"}


@dataclass
class Checkpoint:
    """What a checkpoint directory holds, loaded."""

    path: Path
    model: CharRNN
    tokenizer: CharTokenizer
    meta: dict[str, Any]
    state_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] | None = None

    @property
    def has_training_state(self) -> bool:
        return self.state is not None


# --- saving ---------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    model: CharRNN,
    tokenizer: CharTokenizer,
    meta: dict[str, Any],
    state_tensors: dict[str, torch.Tensor] | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically and return its path.

    Refuses (``CheckpointError``) to save weights that are not finite. On any error
    the temporary directory is removed and the previous checkpoint is left as it was.
    """
    path = Path(path)
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to save non-finite weights ({', '.join(bad[:3])}): the model diverged")
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old"
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process that was killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir()
        hashes = {
            WEIGHTS_FILE: write_file(tmp / WEIGHTS_FILE, save_safetensors_bytes(weights)),
            TOKENIZER_FILE: write_file(tmp / TOKENIZER_FILE, tokenizer.to_hf().to_str(pretty=True).encode()),
        }
        if state is not None:
            tensors = {k: v.detach().cpu().contiguous() for k, v in (state_tensors or {}).items()}
            hashes[STATE_TENSORS_FILE] = write_file(tmp / STATE_TENSORS_FILE, save_safetensors_bytes(tensors))
            hashes[STATE_JSON_FILE] = write_file(tmp / STATE_JSON_FILE, json.dumps(state).encode())
        config = {
            "format_version": FORMAT_VERSION,
            "model": model.config.to_dict(),
            **meta,
            "versions": {"charrnn": __version__, "torch": torch.__version__},
            "files": hashes,
        }
        write_file(tmp / CONFIG_FILE, json.dumps(config, indent=2).encode())
        fsync_dir(tmp)
        # Swap into place: a crash between these two renames leaves the old copy at
        # `old`, where resolve_checkpoint looks for it.
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        # Whatever stopped the save (a full disk, an exception, Ctrl-C in a library
        # caller), put the previous checkpoint back and leave no half-written folder.
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.rename(old, path)
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"could not write checkpoint {path}: {_describe_os_error(exc)}. The previous checkpoint is "
                "unchanged; free some disk space or choose another --out"
            ) from None
        raise
    return path


def check_replaceable(path: Path) -> None:
    """Refuse to save over ``path`` unless it is absent or a checkpoint (``CheckpointError``).

    Only a checkpoint of ours is ever replaced: not a file, a link, or someone's folder
    that happens to be called ``best``.
    """
    if path.is_symlink() or (path.exists() and not (path / CONFIG_FILE).is_file()):
        raise CheckpointError(f"{path} exists and is not a charrnn checkpoint: it is left as it is; choose another --out")


# What a run folder holds once a run has written into it.
RUN_FILES = ("best", "last", "metrics.jsonl")


@contextmanager
def claim_run_dir(run_dir: Path, resuming: bool = False) -> Iterator[None]:
    """Create ``run_dir`` and hold its lock while inside: one training writes into a run at a time.

    The lock is the kernel's, so a run killed with SIGKILL leaves none behind. A folder
    that holds a run already is refused unless this run ``resuming`` it goes on there, and
    ``best`` and ``last`` are checked: now, not after the training a refusal would cost
    (``ConfigError`` or ``CheckpointError``).
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the run directory {run_dir}: {exc.strerror or exc}; choose another --out") from None
    with ExitStack() as held:
        try:
            held.enter_context(folder_lock(run_dir))
        except FolderBusyError as exc:
            raise ConfigError(
                f"{run_dir} is being written by another training ({exc.strerror}): wait for it to end, or choose another --out"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"cannot write to the run directory {run_dir}: {exc.strerror or exc}; make it writable or choose another --out"
            ) from None
        for name in ("best", "last"):  # something not ours under a checkpoint's name: say so first
            check_replaceable(run_dir / name)
        held_run = [name for name in RUN_FILES if (run_dir / name).exists() or (run_dir / name).is_symlink()]
        if held_run and not resuming:
            raise ConfigError(
                f"{run_dir} holds a run already ({', '.join(held_run)}), which a new run would replace: resume it "
                f"with --resume {run_dir}, or choose another --out"
            )
        yield


def _describe_os_error(exc: OSError) -> str:
    code = exc.errno
    if code is None and len(exc.args) == 1 and isinstance(exc.args[0], int):
        code = exc.args[0]  # OSError(errno.ENOSPC), as some wrappers raise it
    if code == errno.ENOSPC:
        return "the disk is full (no space left on device)"
    return exc.strerror or (os.strerror(code) if code else str(exc))


# --- loading --------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path, names: tuple[str, ...] = ("best", "last")) -> Path:
    """The checkpoint directory for ``path``: a checkpoint, or a run directory (the first of its ``names``).

    Sampling takes a run's ``best``, else its ``last``; resuming takes its ``last``
    (``names=("last",)``), the one with training state. If a save was interrupted between
    its two renames, the intact previous copy (``.NAME.old``) is used.
    ``hf:OWNER/NAME[@REVISION]`` is a checkpoint on the Hugging Face Hub: this is the one
    place such a name becomes a folder (the Hub cache's copy, downloaded first if need be),
    which is then checked like any other.
    """
    if is_hub_name(str(path)):
        path = download_checkpoint(str(path), CHECKPOINT_FILES)
    path = Path(path).expanduser()
    if (path / CONFIG_FILE).exists():
        return path
    for name in names:
        for candidate in (path / name, path / f".{name}.old"):
            if (candidate / CONFIG_FILE).exists():
                return candidate
    old = path.parent / f".{path.name}.old"
    if (old / CONFIG_FILE).exists():
        return old
    if names == ("last",) and any((path / n / CONFIG_FILE).exists() for n in ("best", ".best.old")):
        raise CheckpointError(
            f"{path} holds no 'last' checkpoint to resume from, only 'best' (which has no training state): "
            "sample from it, or train a new run"
        )
    if path.is_dir():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = (
            f" ({', '.join(pickles[:3])} looks like a pickled torch checkpoint, which charrnn never loads: "
            "unpickling can run any code)"
            if pickles
            else ""
        )
        raise CheckpointError(f"{path} holds no {CONFIG_FILE}: it is not a charrnn checkpoint or run directory{hint}")
    if path.exists():
        raise CheckpointError(
            f"{path} is a file, not a checkpoint: a charrnn checkpoint is a directory (a run's 'best' or 'last'); "
            "pickled torch files are never loaded"
        )
    raise CheckpointError(f"checkpoint {path} not found: pass a run directory or its 'best' / 'last' folder")


def find_latest_checkpoint(root: str | Path = "checkpoints") -> Path:
    """The newest ``best`` checkpoint under ``root`` (by the time it was written)."""
    root = Path(root)
    candidates = [p.parent for p in root.glob(f"*/best/{CONFIG_FILE}")]
    if not candidates:
        raise CheckpointError(
            f"no checkpoint under {root}/: train one with `python train.py --data shakespeare`, or pass --checkpoint PATH"
        )
    return max(candidates, key=lambda p: (p / CONFIG_FILE).stat().st_mtime)


def _read(path: Path, name: str, hashes: dict[str, str] | None) -> bytes:
    file = path / name
    try:
        data = read_bytes(file, _READ_LIMITS.get(name, MAX_JSON_BYTES))
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete; use another checkpoint") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {file}: {exc.strerror or exc}; use another checkpoint") from None
    if hashes is not None:
        expected = hashes.get(name)
        if expected is None:
            raise CheckpointError(f"{path / CONFIG_FILE} records no checksum for {name}: the checkpoint is damaged")
        if hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(f"{file} is damaged (its sha256 does not match {CONFIG_FILE}): use another checkpoint")
    return data


def _load_tensors(path: Path, name: str, hashes: dict[str, str]) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_bytes(_read(path, name, hashes))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path / name} is not a readable safetensors file ({exc})") from None


def _load_json(path: Path, name: str, hashes: dict[str, str] | None) -> Any:
    try:
        return parse_json(_read(path, name, hashes))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path / name} is not valid JSON ({exc}): the checkpoint is damaged") from None


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", with_training_state: bool = False) -> Checkpoint:
    """Load a checkpoint directory (or a run directory's ``best``; its ``last`` ``with_training_state``) safely.

    Every failure, from a missing file to random bytes, is a ``CheckpointError`` naming
    the file. No file is unpickled and no code from the checkpoint runs.
    """
    path = resolve_checkpoint(path, ("last",) if with_training_state else ("best", "last"))
    config = _load_json(path, CONFIG_FILE, None)
    if not isinstance(config, dict) or not isinstance(config.get("files"), dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path / CONFIG_FILE} is not a charrnn checkpoint config (no 'model' or 'files')")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path / CONFIG_FILE} has format version {config.get('format_version')!r}; "
            f"this charrnn reads version {FORMAT_VERSION}"
        )
    hashes = config["files"]
    try:
        model_config = ModelConfig.from_dict(config["model"])
        if model_config.unresolved:  # a saved model always has its size: auto was resolved before training
            raise ConfigError(f"{', '.join(model_config.unresolved)} missing")
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path / CONFIG_FILE} holds an invalid model config: {exc}") from None

    try:
        tokenizer = CharTokenizer.load_bytes(_read(path, TOKENIZER_FILE, hashes))
    except ValueError as exc:
        raise CheckpointError(f"{path / TOKENIZER_FILE} is not a charrnn tokenizer ({exc})") from None
    if tokenizer.vocab_size != model_config.vocab_size:
        raise CheckpointError(
            f"{path / TOKENIZER_FILE} has {tokenizer.vocab_size} characters but {path / CONFIG_FILE} says "
            f"{model_config.vocab_size}: the files come from different runs"
        )

    weights = _load_tensors(path, WEIGHTS_FILE, hashes)
    # Every layer has tensors of its own: a damaged n_layers must not make us build millions of layers.
    if model_config.n_layers > len(weights):
        raise CheckpointError(
            f"{path / WEIGHTS_FILE} does not fit the model in {CONFIG_FILE} ({len(weights)} tensors for "
            f"{model_config.n_layers} layers): the files come from different runs"
        )
    try:
        # Built on the meta device first: a damaged config cannot make us allocate
        # a huge model before the shapes are compared with the (verified) weights.
        with torch.device("meta"):
            model = CharRNN(model_config)
    except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"{path / CONFIG_FILE} holds an invalid model config: {exc}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != found:
        diff = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        raise CheckpointError(f"{path / WEIGHTS_FILE} does not fit the model in {CONFIG_FILE} (differs at {', '.join(diff[:3])})")
    if not all(torch.isfinite(w).all() for w in weights.values()):
        raise CheckpointError(f"{path / WEIGHTS_FILE} holds non-finite weights: use another checkpoint")
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
    model.to(device).eval()

    ckpt = Checkpoint(path=path, model=model, tokenizer=tokenizer, meta=config)
    if with_training_state:
        if STATE_JSON_FILE not in hashes:
            raise CheckpointError(
                f"{path} holds no training state (only 'last' checkpoints do): resume from the run's 'last' folder"
            )
        ckpt.state_tensors = _load_tensors(path, STATE_TENSORS_FILE, hashes)
        state = _load_json(path, STATE_JSON_FILE, hashes)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path / STATE_JSON_FILE} is damaged: expected a JSON object")
        ckpt.state = state
    return ckpt

"""Run a model outside Python: its one-character step as an ONNX graph, plus the vocabulary.

The exported graph is one step of the recurrence, with the state as explicit inputs and
outputs, so any ONNX runtime can sample from it with a loop of its own::

    inputs   token  int64 (B,)          the character just read (its id in vocab.json)
             h      float32 (L, B, H)   the hidden state before it (zeros to start)
             c      float32 (L, B, H)   the LSTM cell state (LSTM only)
    outputs  logits float32 (B, V)      scores of the next character
             h_out, c_out               the state after it

``B`` (streams side by side) is free; ``L``, ``H`` and ``V`` are the model's. The folder
also holds ``vocab.json`` (id -> character, and these shapes) and the checkpoint's
``tokenizer.json``. The graph comes from PyTorch's dynamo exporter (``torch.onnx.export``
with ``dynamo=True``, which needs ``onnx`` and ``onnxscript``), in eval mode: no dropout.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._io import MAX_JSON_BYTES, atomic_write, output_target, read_bytes
from ..checkpoint import TOKENIZER_FILE, load_checkpoint, resolve_checkpoint
from ..errors import CheckpointError, ExportError
from ..model import CELL_TABLE, CharRNN, State

ONNX_FILE = "model.onnx"
VOCAB_FILE = "vocab.json"
OPSET = 18  # understood by onnxruntime 1.14 (2023) and later, and by most other runtimes


class OneStep(nn.Module):
    """One character through the model: (token, state) -> (logits, state), for export."""

    def __init__(self, model: CharRNN):
        super().__init__()
        self.model = model

    def forward(self, token: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """token (B,), h and (LSTM) c (L, B, H) -> logits (B, V) and the state's tensors after it."""
        logits, state = self.model(token[:, None], State(h, c))  # eval mode: no dropout
        return logits[:, 0], *state.tensors()


@dataclass(frozen=True)
class Export:
    """Where an export went."""

    folder: Path
    onnx: Path
    vocab: Path


def export_onnx(checkpoint: str | Path, out: str | Path) -> Export:
    """Export ``checkpoint``'s one-character step to ``out/model.onnx``, with ``vocab.json`` and ``tokenizer.json``."""
    try:
        import onnx  # noqa: F401  (the exporter needs both; say so before it fails deep inside)
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs the onnx and onnxscript packages: pip install 'charrnn-lm[onnx]'") from None
    ckpt = load_checkpoint(checkpoint, "cpu")
    model = ckpt.model.float().eval()
    config = model.config
    state_names = CELL_TABLE[config.cell].state_names  # ("h", "c") for an LSTM, ("h",) otherwise
    folder = Path(out).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create --out {folder}: {exc.strerror or exc}") from None
    for name in (ONNX_FILE, VOCAB_FILE, TOKENIZER_FILE):  # all three checked before any is written
        try:
            output_target(folder / name)
        except OSError as exc:
            raise ExportError(f"cannot write {folder / name}: {exc.strerror or exc}; choose another --out") from None

    step = OneStep(model).eval()
    zeros = State.zeros(config.n_layers, 2, config.hidden_size, CELL_TABLE[config.cell].has_cell_state)
    args = (torch.tensor([1, 2]), *zeros.tensors())
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = ({0: batch},) + ({1: batch},) * len(state_names)
    names_in = ["token", *state_names]
    names_out = ["logits", *(f"{name}_out" for name in state_names)]
    target = folder / ONNX_FILE
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # notes about torchvision ops this model has none of
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on torch internals: nothing a user can act on
            program = torch.onnx.export(
                step, args, dynamo=True, dynamic_shapes=shapes, input_names=names_in, output_names=names_out,
                opset_version=OPSET, verbose=False, optimize=True,
            )  # fmt: skip
        with atomic_write(target) as f:
            f.write(program.model_proto.SerializeToString())
    except OSError as exc:
        raise ExportError(f"cannot write {target}: {exc.strerror or exc}") from None

    vocab = {
        "chars": ckpt.tokenizer.chars[1:],  # ids 1..V-1; id 0 is <unk>
        "unk_id": 0,
        "vocab_size": config.vocab_size,
        "cell": config.cell,
        "n_layers": config.n_layers,
        "hidden_size": config.hidden_size,
        "inputs": {"token": "int64 (batch,)"} | {name: "float32 (n_layers, batch, hidden_size)" for name in state_names},
        "outputs": {"logits": "float32 (batch, vocab_size)"} | {f"{name}_out": f"as {name}" for name in state_names},
        "opset": OPSET,
        "checkpoint": str(ckpt.path),
    }
    try:
        with atomic_write(folder / VOCAB_FILE, "w", encoding="utf-8") as f:
            json.dump(vocab, f, indent=2, ensure_ascii=False)
        with atomic_write(folder / TOKENIZER_FILE) as f:  # the checkpoint's own bytes (checked when it loaded)
            f.write(read_bytes(ckpt.path / TOKENIZER_FILE, MAX_JSON_BYTES))
    except OSError as exc:
        raise ExportError(f"cannot write into {folder}: {exc.strerror or exc}") from None
    return Export(folder, target, folder / VOCAB_FILE)


def default_export_folder(checkpoint: str | Path) -> Path:
    """``RUN/onnx`` beside a local checkpoint; ``NAME-onnx`` here for a Hub one."""
    spec = str(checkpoint)
    if spec.startswith("hf:"):
        return Path(spec[3:].split("@")[0].replace("/", "--") + "-onnx")
    path = Path(spec).expanduser()
    try:
        return resolve_checkpoint(path).parent / "onnx"
    except CheckpointError:
        return path / "onnx"

"""Coverage-guided fuzzing (atheris) of the loaders of outside files: checkpoints, chat sessions, JSON.

Not part of the test suite (it runs for as long as it is told); the crashes it found are
tests in tests/test_properties.py and tests/test_hostile.py. A crash is any exception
other than the loader's own error type: a traceback a user would see.

    pip install atheris==3.0.0
    python tests/fuzz/fuzz_loaders.py checkpoint -runs=20000     # or -max_total_time=60
    python tests/fuzz/fuzz_loaders.py session -runs=20000
    python tests/fuzz/fuzz_loaders.py json -runs=200000

In ``checkpoint`` mode the first byte picks a file of a small valid checkpoint, the rest
replaces it, and its sha256 is recorded anew in config.json (as a forger would), so the
values behind the checksums are fuzzed too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["charrnn"]):
    import torch

    from charrnn._io import parse_json
    from charrnn.checkpoint import load_checkpoint, save_checkpoint
    from charrnn.config import ModelConfig
    from charrnn.errors import CheckpointError, SessionFileError
    from charrnn.generation.chat import ChatSession
    from charrnn.generation.sampler import Sampler
    from charrnn.model import CharRNN
    from charrnn.tokenizer import CharTokenizer

FILES = ("config.json", "tokenizer.json", "training_state.json", "model.safetensors", "training_state.safetensors")
ROOT = Path(tempfile.mkdtemp(prefix="charrnn-fuzz-"))


def _pristine() -> tuple[Path, Sampler, bytes]:
    tokenizer = CharTokenizer.from_text("ROMEO: O Juliet, the king sat on the mat.\n")
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=tokenizer.vocab_size, n_layers=1, hidden_size=8, embedding_size=4, dropout=0.0))
    tensors = {"rng.cpu": torch.get_rng_state()}
    path = save_checkpoint(ROOT / "pristine", model, tokenizer, {"step": 1}, tensors, {"step": 1})
    sampler = Sampler(model.eval(), tokenizer, torch.device("cpu"), kernel=False)
    session = sampler.chat(seed=1)
    session.send("ROMEO:")
    return path, sampler, session.save(ROOT / "pristine.session").read_bytes()


PRISTINE, SAMPLER, SESSION = _pristine()


def fuzz_checkpoint(data: bytes) -> None:
    if not data:
        return
    name, content = FILES[data[0] % len(FILES)], data[1:]
    ckpt = ROOT / "case"
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.copytree(PRISTINE, ckpt)
    (ckpt / name).write_bytes(content)
    if name != "config.json":
        config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        config["files"][name] = hashlib.sha256(content).hexdigest()
        (ckpt / "config.json").write_text(json.dumps(config), encoding="utf-8")
    try:
        load_checkpoint(ckpt, with_training_state=True)
    except CheckpointError:
        pass


def fuzz_session(data: bytes) -> None:
    # Half the cases keep the real file's first bytes, so the fuzzer starts inside valid safetensors.
    fdp = atheris.FuzzedDataProvider(data)
    keep = fdp.ConsumeIntInRange(0, len(SESSION))
    (ROOT / "case.session").write_bytes(SESSION[:keep] + fdp.ConsumeBytes(fdp.remaining_bytes()))
    try:
        ChatSession.load(SAMPLER, ROOT / "case.session")
    except SessionFileError:
        pass


def fuzz_json(data: bytes) -> None:
    try:
        parse_json(data)
    except ValueError:
        pass


if __name__ == "__main__":
    targets = {"checkpoint": fuzz_checkpoint, "session": fuzz_session, "json": fuzz_json}
    if len(sys.argv) < 2 or sys.argv[1] not in targets:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(targets)}}} [libFuzzer flags, e.g. -runs=20000]")
    target = targets[sys.argv.pop(1)]
    try:
        atheris.Setup(sys.argv, target)
        atheris.Fuzz()
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)

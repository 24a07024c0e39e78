"""--log tensorboard: event files in the run folder, readable while the run is still going."""

from __future__ import annotations

import json
import math

import pytest
from conftest import tiny_model_config, tiny_train_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from charrnn.generation.sampler import preview_text
from charrnn.training.callbacks import Callback, TensorBoardLog, default_callbacks
from charrnn.training.trainer import train


def _read(folder) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


class ReadWhileRunning(Callback):
    """At the second evaluation, read the event files back: the run has steps still to go."""

    def __init__(self):
        self.seen = None

    def on_checkpoint(self, trainer, val_loss, improved):
        if trainer.step == 20:
            self.seen = (trainer.step, trainer.config.max_iters, _read(trainer.run_dir / "tensorboard"), val_loss)


def test_event_files_hold_the_run_while_it_goes(corpus_file, tmp_path):
    config = tiny_train_config(corpus_file, tmp_path / "run", max_iters=30, eval_interval=10, log="tensorboard", sample_chars=60)
    probe = ReadWhileRunning()
    callbacks = default_callbacks(config, preview_text)
    assert any(isinstance(c, TensorBoardLog) for c in callbacks)  # --log tensorboard adds it to the default set
    result = train(config, tiny_model_config(), callbacks=[*callbacks, probe], preview=preview_text)
    step, max_iters, acc, val_loss = probe.seen
    assert step < max_iters  # read back mid-run
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/chars_per_second", "val/loss", "val/bpc"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 21))
    assert [e.step for e in acc.Scalars("val/loss")] == [10, 20]
    assert acc.Scalars("val/loss")[-1].value == pytest.approx(val_loss, rel=1e-6)
    assert acc.Scalars("val/bpc")[-1].value == pytest.approx(val_loss / math.log(2), rel=1e-6)
    assert all(e.value > 0 for e in acc.Scalars("train/chars_per_second"))
    sample = acc.Tensors("sample/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert len(sample.replace("\n    ", "\n").removeprefix("    ")) == 60

    # The event files agree with metrics.jsonl, which stays as it was.
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    final = _read(result.run_dir / "tensorboard")
    assert [e.step for e in final.Scalars("train/loss")] == list(range(1, 31))
    assert all(e.value == pytest.approx(losses[e.step], rel=1e-6) for e in final.Scalars("train/loss"))
    lrs = {m["step"]: m["lr"] for m in metrics if "lr" in m}
    assert all(e.value == pytest.approx(lrs[e.step], rel=1e-6) for e in final.Scalars("train/lr"))


def test_a_resumed_run_continues_the_same_curves(corpus_file, tmp_path):
    out = tmp_path / "run"
    train(tiny_train_config(corpus_file, out, max_iters=10, eval_interval=10, log="tensorboard"), tiny_model_config())
    train(tiny_train_config(corpus_file, out, max_iters=20, eval_interval=10, log="tensorboard", resume=str(out / "last")))
    acc = _read(out / "tensorboard")
    assert sorted({e.step for e in acc.Scalars("train/loss")}) == list(range(1, 21))
    assert [e.step for e in acc.Scalars("val/loss")] == [10, 20]

"""The Hugging Face Hub: push_to_hub / charrnn push, and hf:OWNER/NAME checkpoints, against a local fake Hub.

The real client (snapshot_download, HfApi.create_repo / upload_folder, ModelCard.load)
talks to tests/fake_hub.py through HF_ENDPOINT; nothing reaches the network.
"""

from __future__ import annotations

import json
import shutil
import time

import huggingface_hub
import pytest
import torch
from conftest import SAMPLE_SCRIPT, run_python, tiny_model_config, tiny_train_config
from fake_hub import FakeHub
from huggingface_hub import ModelCard

import charrnn
from charrnn.cli import push
from charrnn.errors import CheckpointError, HubError
from charrnn.training.trainer import train

REPO_ID = "romeo/tiny-lstm"
TOKEN = "hf_fake_token_for_tests"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake Hub on 127.0.0.1, with HF_ENDPOINT pointed at it and an empty Hub cache.

    huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and the cache folder when it is
    first imported; the process imported it already, so its constants are set to what
    the environment would have given it.
    """
    with FakeHub() as fake:
        cache = tmp_path / "hf_home" / "hub"
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        constants = huggingface_hub.constants
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        fake.cache = cache
        yield fake


def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_push_uploads_best_with_a_model_card_private_by_default(hub, trained_run):
    result = charrnn.push_to_hub(trained_run.run_dir, REPO_ID)
    assert result.private and hub.created[-1]["visibility"] == "private"
    assert hub.repos[REPO_ID].private
    _, files = hub.repos[REPO_ID].files_at("main")
    assert set(files) == {"config.json", "model.safetensors", "tokenizer.json", "README.md"}
    for name in ("config.json", "model.safetensors", "tokenizer.json"):  # the checkpoint's bytes, untouched
        assert files[name] == (trained_run.best / name).read_bytes()

    card = ModelCard.load(REPO_ID)  # through the real client, from the fake Hub
    data = card.data.to_dict()
    meta = json.loads((trained_run.best / "config.json").read_text())
    assert data["library_name"] == "charrnn" and data["pipeline_tag"] == "text-generation"
    assert (data["cell"], data["n_layers"], data["hidden_size"]) == ("lstm", 2, 32)
    assert data["corpus"] == "tiny"
    assert data["val_loss_nats"] == pytest.approx(meta["best_val_loss"], abs=1e-4)
    assert data["val_bpc"] == pytest.approx(meta["best_val_loss"] / 0.6931471805599453, abs=1e-4)
    assert data["training_seconds"] == pytest.approx(meta["elapsed"], abs=0.1)
    sample = charrnn.load(trained_run.best, device="cpu").generate("\n", length=400, temperature=0.8, seed=1)
    assert sample.strip("\n")[:200] in card.text  # a real sample of this model
    assert f'charrnn.load("hf:{REPO_ID}")' in card.text and "nats/char" in card.text
    # What it trained on, by name only (no local folders), with the sha256 of the text read.
    source = meta["data"]["sources"][0]
    assert f"| `tiny.txt` | 8,000 | 1 | `{source['sha256']}` |" in card.text
    assert "Validated on the last 10% of the corpus." in card.text and str(trained_run.best.parent) not in card.text


def test_a_downloaded_checkpoint_writes_what_the_local_one_writes(hub, trained_run):
    charrnn.push_to_hub(trained_run.run_dir, REPO_ID)
    local = charrnn.load(trained_run.best, device="cpu", dtype=torch.float32)
    remote = charrnn.load(f"hf:{REPO_ID}", device="cpu", dtype=torch.float32)
    for seed in (1, 2):
        assert remote.generate("ROMEO:\n", length=200, seed=seed) == local.generate("ROMEO:\n", length=200, seed=seed)
    assert any((hub.cache / "models--romeo--tiny-lstm" / "snapshots").iterdir())  # in the Hub's own cache


def test_a_revision_picks_that_commit(hub, trained_run, corpus_file, tmp_path):
    first = hub.publish_folder(REPO_ID, trained_run.best)
    other = train(tiny_train_config(corpus_file, tmp_path / "gru", max_iters=5, eval_interval=5), tiny_model_config(cell="gru"))
    hub.publish_folder(REPO_ID, other.best)
    assert charrnn.load(f"hf:{REPO_ID}@{first}", device="cpu").model.config.cell == "lstm"
    assert charrnn.load(f"hf:{REPO_ID}", device="cpu").model.config.cell == "gru"
    with pytest.raises(HubError, match="has no revision 'v9'"):
        charrnn.load(f"hf:{REPO_ID}@v9")


def test_offline_the_cached_copy_is_used_and_a_missing_one_is_named(hub, trained_run, monkeypatch):
    hub.publish_folder(REPO_ID, trained_run.best)
    expected = charrnn.load(f"hf:{REPO_ID}", device="cpu").generate("KING:", length=80, seed=3)
    seen = len(hub.requests)
    _offline(monkeypatch)
    assert charrnn.load(f"hf:{REPO_ID}", device="cpu").generate("KING:", length=80, seed=3) == expected
    assert len(hub.requests) == seen  # nothing was asked of the Hub
    with pytest.raises(
        HubError, match=r"hf:romeo/other is not in the Hugging Face cache .* cannot be reached \(HF_HUB_OFFLINE is set\)"
    ):
        charrnn.load("hf:romeo/other")


def test_an_unreachable_hub_falls_back_to_the_cache(hub, trained_run):
    hub.publish_folder(REPO_ID, trained_run.best)
    charrnn.load(f"hf:{REPO_ID}", device="cpu")
    hub.server.shutdown()
    hub.server.server_close()  # connection refused from now on
    assert charrnn.load(f"hf:{REPO_ID}", device="cpu").model.config.hidden_size == 32
    with pytest.raises(HubError, match="not in the Hugging Face cache"):
        charrnn.load("hf:romeo/never-downloaded")


def test_hub_mistakes_are_one_sentence(hub, trained_run, capsys):
    with pytest.raises(HubError, match="no model romeo/missing on the Hub, or it is private"):
        charrnn.load("hf:romeo/missing")
    with pytest.raises(HubError, match="is not a Hub model name: write hf:OWNER/NAME"):
        charrnn.load("hf:just-a-name")
    assert push.main([str(trained_run.run_dir), "not a repo"]) == 2
    assert "is not a Hub model name" in capsys.readouterr().err


def test_a_damaged_file_on_the_hub_is_caught_like_a_local_one(hub, trained_run):
    files = {p.name: p.read_bytes() for p in trained_run.best.iterdir()}
    weights = bytearray(files["model.safetensors"])
    weights[-5] ^= 0xFF
    hub.commit(REPO_ID, {**files, "model.safetensors": bytes(weights)})
    with pytest.raises(CheckpointError, match="model.safetensors is damaged"):
        charrnn.load(f"hf:{REPO_ID}")


def test_push_command_and_sample_from_the_hub_in_a_fresh_process(hub, trained_run, subprocess_env, tmp_path, capsys):
    assert push.main([str(trained_run.run_dir), REPO_ID, "--public", "--sample-length", "100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"pushed to {REPO_ID} (public where new): {hub.url}/{REPO_ID}/commit/")
    assert hub.created[-1]["visibility"] == "public"
    # A new process reads HF_ENDPOINT and the cache folder from its environment, as a user's would.
    env = {**subprocess_env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "home")}
    args = ["--prompt", "ROMEO:", "--length", "120", "--seed", "5", "--device", "cpu", "--precision", "float32"]
    remote = run_python([SAMPLE_SCRIPT, "--checkpoint", f"hf:{REPO_ID}", *args], env, tmp_path)
    assert remote.returncode == 0, remote.stderr
    local = run_python([SAMPLE_SCRIPT, "--checkpoint", str(trained_run.best), *args], env, tmp_path)
    assert remote.stdout == local.stdout and len(remote.stdout) == len("ROMEO:") + 120 + 1
    assert (tmp_path / "home" / "hub" / "models--romeo--tiny-lstm").is_dir()


# --- a hostile Hub (or HF_ENDPOINT pointed at one) ------------------------------------------------


def _outside(tmp_path):
    """Every file under tmp_path that is not in the Hub cache: what a hostile answer must not add to."""
    cache = tmp_path / "hf_home"
    return {p for p in tmp_path.rglob("*") if not p.is_relative_to(cache)}


@pytest.mark.parametrize("revision", ["../../../outside", "/etc", "main/../..", "a\x00b", "dev\nx", "a//b", "v1/"])
def test_a_revision_that_is_a_path_is_refused_before_the_hub_is_asked(hub, revision):
    with pytest.raises(HubError, match="is not a branch, tag or commit name"):
        charrnn.load(f"hf:{REPO_ID}@{revision}")
    assert hub.requests == []


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        ({"sha": "../../../../outside"}, "which is not a commit sha"),  # would name the snapshot folder
        ({"etag": '"../../../../outside"'}, "which is not a file hash"),  # would name the blob and its lock
        ({"commit": "../../../../outside"}, "which is not a commit sha"),
    ],
)
def test_an_answer_that_leads_outside_the_cache_is_refused_and_writes_nothing_there(hub, trained_run, tmp_path, tamper, named):
    hub.publish_folder(REPO_ID, trained_run.best)
    before = _outside(tmp_path)
    hub.tamper.update(tamper)
    with pytest.raises(HubError, match=named):
        charrnn.load(f"hf:{REPO_ID}")
    assert _outside(tmp_path) == before


def test_a_cached_file_that_links_outside_the_cache_is_not_read(hub, trained_run, tmp_path, monkeypatch):
    hub.publish_folder(REPO_ID, trained_run.best)
    charrnn.load(f"hf:{REPO_ID}", device="cpu")
    snapshot = next((hub.cache / "models--romeo--tiny-lstm" / "snapshots").iterdir())
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes((snapshot / "config.json").read_bytes())
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(elsewhere)
    _offline(monkeypatch)
    with pytest.raises(HubError, match="leads outside the Hub cache"):
        charrnn.load(f"hf:{REPO_ID}")


def test_only_the_checkpoint_files_are_fetched_and_odd_listing_paths_are_left(hub, trained_run):
    files = {p.name: p.read_bytes() for p in trained_run.best.iterdir()}
    hub.commit(REPO_ID, {**files, "huge.bin": b"\0" * 100_000, "notes/secret.txt": b"x"})
    hub.tamper["extra_path"] = "../../../escaped.txt"
    assert charrnn.load(f"hf:{REPO_ID}", device="cpu").model.config.hidden_size == 32
    fetched = {path.rsplit("/", 1)[-1] for method, path in hub.requests if "/resolve/" in path}
    assert fetched == {"config.json", "model.safetensors", "tokenizer.json"}
    assert not list(hub.cache.rglob("huge.bin")) and not list(hub.cache.parent.parent.rglob("escaped.txt"))


def test_a_hub_that_stalls_is_given_up_on(hub, trained_run, monkeypatch):
    hub.publish_folder(REPO_ID, trained_run.best)
    monkeypatch.setattr(charrnn.hub, "READ_TIMEOUT", 0.5)
    hub.tamper["stall"] = 3
    started = time.monotonic()
    with pytest.raises(HubError):
        charrnn.load(f"hf:{REPO_ID}")
    assert time.monotonic() - started < 2.5  # the 0.5 s read timeout, not the 3 s stall (nor forever)


def test_push_uploads_only_the_checkpoint_and_refuses_links_out(hub, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.best, run / "best")
    (run / "best" / ".env").write_text("HF_TOKEN=hf_secret\n")
    (tmp_path / "secret.txt").write_text("password")
    (run / "best" / "notes.txt").symlink_to(tmp_path / "secret.txt")
    charrnn.push_to_hub(run, REPO_ID)
    _, files = hub.repos[REPO_ID].files_at("main")
    assert set(files) == {"config.json", "model.safetensors", "tokenizer.json", "README.md"}

    weights = run / "best" / "model.safetensors"
    (tmp_path / "weights").write_bytes(weights.read_bytes())
    weights.unlink()
    weights.symlink_to(tmp_path / "weights")
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        charrnn.push_to_hub(run, "romeo/other")
    assert "romeo/other" not in hub.repos


def test_push_to_a_branch_commits_there(hub, trained_run):
    charrnn.push_to_hub(trained_run.run_dir, REPO_ID)
    main = hub.repos[REPO_ID].refs["main"]
    charrnn.push_to_hub(trained_run.run_dir, f"{REPO_ID}@dev", message="to dev")
    assert hub.repos[REPO_ID].refs["main"] == main
    assert hub.repos[REPO_ID].refs["dev"] != main
    assert charrnn.load(f"hf:{REPO_ID}@dev", device="cpu").model.config.hidden_size == 32

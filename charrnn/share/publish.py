"""Share a trained model on the Hugging Face Hub: ``push_to_hub`` (``charrnn push RUN OWNER/NAME``).

What goes up is the run's ``best`` checkpoint, exactly as it is on disk (every file
still checked against the sha256 in its ``config.json`` when it is downloaded), and a
generated model card (``README.md``): Hub metadata (``library_name: charrnn``, the
corpus, the cell and size, the validation loss), a table of the same figures, the
training time, a sample the model writes, and how to load it. The repository is made
private unless ``private=False``: a model trained on one's own text is often not for
everyone.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import CHECKPOINT_FILES, CONFIG_FILE, load_checkpoint, resolve_checkpoint
from ..data.corpus import corpus_name
from ..errors import CheckpointError
from ..evaluation import LN2
from ..generation.sampler import Sampler
from ..hub import parse_hub_name, upload_folder
from ..model import CELL_TABLE, count_parameters

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

CARD_FILE = "README.md"
SAMPLE_PROMPT = "\n"
SAMPLE_LENGTH = 400

_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A character-level {{ cell_name }} language model ({{ n_layers }} x {{ hidden_size }} units,
{{ parameters }} parameters, a vocabulary of {{ vocab_size }} characters), trained with
charrnn on {{ corpus_title }}.

| | |
| --- | --- |
| corpus | {{ corpus_title }} |
| model | {{ cell }} {{ n_layers }}x{{ hidden_size }}, embedding {{ embedding_size }}, {{ parameters }} parameters |
| validation loss | {{ val_loss }} nats/char ({{ val_bpc }} bits/char) on {{ validated_on }} |
| training | {{ steps }} steps, {{ training_time }} of training ({{ dtype }}) |
{% if data_rows %}
## Data

| source | characters | files | sha256 of the text read |
| --- | --- | --- | --- |
{% for row in data_rows %}| {{ row }} |
{% endfor %}
Validated on {{ validated_on }}.
{% endif %}

## A sample

Written by this model (temperature {{ temperature }}, seed {{ seed }}):

```text
{{ sample }}
```

## Use it

With charrnn installed:

```bash
charrnn sample --checkpoint hf:{{ repo_id }} --prompt "ROMEO:"
```

```python
import charrnn
sampler = charrnn.load("hf:{{ repo_id }}")
print(sampler.generate("ROMEO:", length=200, temperature=0.8, seed=1))
```
"""


@dataclass(frozen=True)
class PushResult:
    """Where a push went."""

    repo_id: str
    commit_url: str
    private: bool
    card: "ModelCard"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "an unrecorded time"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else (f"{minutes} min {secs} s" if minutes else f"{secs} s")


def _source_name(source: str) -> str:
    """A source as a card shows it: an hf: name whole, a local path by its last part only (no private folders)."""
    return source if source.startswith("hf:") else f"`{Path(source).name}`"


def _data_rows(record: Any) -> tuple[list[str], str]:
    """The card's data table rows (``config.json``'s ``data`` record) and what validated."""
    if not isinstance(record, dict) or not isinstance(record.get("sources"), list):
        return [], "the last 10% of the corpus"  # saved before the record existed
    rows = []
    for source in record["sources"]:
        if isinstance(source, dict):
            name = _source_name(str(source.get("source", "?")))
            split = f" ({source['split']})" if source.get("split") else ""
            share = f", share {source['share']:.0%}" if isinstance(source.get("share"), (int, float)) else ""
            chars, files, digest = source.get("chars", 0), source.get("files", 1), source.get("sha256", "-")
            rows.append(f"{name}{split}{share} | {chars:,} | {files} | `{digest}`")
    if isinstance(record.get("validation"), list):  # several corpora, each with its own validation part
        return rows, "each corpus's own validation part, weighted by size"
    validation = record.get("validation") if isinstance(record.get("validation"), dict) else {}
    if validation.get("part") == "all of it":  # a validation source of its own
        split = f" ({validation['split']} split)" if validation.get("split") else ""
        return rows, f"all of {_source_name(str(validation.get('source', '?')))}{split}"
    files = record["sources"][0].get("files", 1) if isinstance(record["sources"][0], dict) else 1
    return rows, f"the last 10% of each of the corpus's {files} files" if files > 1 else "the last 10% of the corpus"


def _corpus_title(data: str) -> str:
    if data == "shakespeare":
        return "Tiny Shakespeare (1,115,394 characters)"
    if data.startswith("hf:"):
        return f"the Hugging Face dataset [{data[3:]}](https://huggingface.co/datasets/{data[3:]})"
    return f"`{Path(data).name}`"


def model_card(
    checkpoint: str | Path, repo_id: str, prompt: str = SAMPLE_PROMPT, length: int = SAMPLE_LENGTH, seed: int = 1
) -> "ModelCard":
    """The Hub model card of ``checkpoint``, with a sample of ``length`` characters it writes."""
    from huggingface_hub import ModelCard, ModelCardData  # slow to import; only a push needs it

    ckpt = load_checkpoint(checkpoint)
    meta, config = ckpt.meta, ckpt.model.config
    train: dict[str, Any] = meta.get("train", {}) if isinstance(meta.get("train"), dict) else {}
    given = train.get("data", "unknown")
    sources = [str(d) for d in given] if isinstance(given, list) else [str(given)]
    data = sources[0]
    val = meta.get("best_val_loss")
    temperature = 0.8
    # Sampled as `charrnn sample --seed SEED` samples (default precision), so a reader can reproduce it.
    sample = Sampler(ckpt.model, ckpt.tokenizer, "cpu").generate(prompt, length=length, temperature=temperature, seed=seed)
    elapsed = meta.get("elapsed")
    data_rows, validated_on = _data_rows(meta.get("data"))
    card_data = ModelCardData(
        library_name="charrnn",
        pipeline_tag="text-generation",
        tags=["charrnn", "char-rnn", "character-level", config.cell, "text-generation"],
        datasets=[d[3:] for d in sources if d.startswith("hf:")] or None,
        # charrnn's own keys: what a script reading the card wants without parsing the text.
        corpus="+".join(map(corpus_name, sources)) if data != "unknown" else None,
        cell=config.cell,
        n_layers=config.n_layers,
        hidden_size=config.hidden_size,
        embedding_size=config.embedding_size,
        vocab_size=config.vocab_size,
        parameters=count_parameters(ckpt.model),
        val_loss_nats=round(val, 4) if val is not None else None,
        val_bpc=round(val / LN2, 4) if val is not None else None,
        training_seconds=round(elapsed, 1) if elapsed is not None else None,
        steps=meta.get("step"),
    )
    return ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        cell=config.cell,
        cell_name=CELL_TABLE[config.cell].title,
        n_layers=config.n_layers,
        hidden_size=config.hidden_size,
        embedding_size=config.embedding_size,
        vocab_size=config.vocab_size,
        parameters=f"{count_parameters(ckpt.model):,}",
        corpus_title=" and ".join(map(_corpus_title, sources)),
        data_rows=data_rows,
        validated_on=validated_on,
        val_loss=f"{val:.4f}" if val is not None else "not measured",
        val_bpc=f"{val / LN2:.3f}" if val is not None else "-",
        steps=f"{meta.get('step', 0):,}",
        training_time=_duration(elapsed),
        dtype=meta.get("dtype", "float32"),
        temperature=temperature,
        seed=seed,
        sample=(prompt + sample).strip("\n").replace("```", "'''"),
    )


def best_checkpoint(run: str | Path) -> Path:
    """The checkpoint a push uploads: a run's ``best`` (a checkpoint folder itself is taken as given)."""
    path = Path(run).expanduser()
    if (path / CONFIG_FILE).exists():
        return path
    if (path / "best" / CONFIG_FILE).exists():
        return resolve_checkpoint(path / "best")
    raise CheckpointError(f"{path} holds no best checkpoint: pass a run folder with a best/ (or a checkpoint folder)")


def push_to_hub(
    run: str | Path,
    repo_id: str,
    private: bool = True,
    prompt: str = SAMPLE_PROMPT,
    sample_length: int = SAMPLE_LENGTH,
    seed: int = 1,
    message: str | None = None,
) -> PushResult:
    """Upload ``run``'s best checkpoint and a generated model card to Hub model ``repo_id`` (OWNER/NAME[@BRANCH]).

    The repository (and the branch) is created if it does not exist, private unless
    ``private=False`` (an existing repository keeps its visibility). The token is the Hub's usual one
    (``HF_TOKEN`` or ``hf auth login``). Returns where the commit went.
    """
    name = parse_hub_name(repo_id)  # a malformed name fails before anything is read
    checkpoint = best_checkpoint(run)
    files = checkpoint_files(checkpoint)
    card = model_card(checkpoint, name.repo_id, prompt, sample_length, seed)
    with tempfile.TemporaryDirectory(prefix="charrnn-push-") as tmp:
        stage = Path(tmp)
        # The checkpoint's own files as they are on disk (never re-saved), then the card beside them.
        for file in files:
            shutil.copyfile(file, stage / file.name)
        card.save(stage / CARD_FILE)
        names = [file.name for file in files] + [CARD_FILE]
        url = upload_folder(stage, str(name), private, message or f"charrnn: upload {checkpoint.name}", names)
    return PushResult(name.repo_id, url, private, card)


def checkpoint_files(checkpoint: Path) -> list[Path]:
    """The files a push uploads: those a checkpoint is made of, each a regular file whose real path is in the folder.

    Nothing else in the folder goes up (a ``.env``, notes, a link to a secret elsewhere).
    """
    folder = checkpoint.resolve()
    files = []
    for name in CHECKPOINT_FILES:
        file = checkpoint / name
        if not (file.exists() or file.is_symlink()):
            continue
        real = file.resolve()
        if real.parent != folder or not real.is_file():
            raise CheckpointError(
                f"{file} leads to {real}, outside the checkpoint (or to no regular file): push uploads only the "
                "checkpoint's own files; put the file itself there in place of the link"
            )
        files.append(file)
    return files

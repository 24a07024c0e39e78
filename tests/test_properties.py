"""Properties over many inputs (hypothesis): the tokenizer on any text, the loader on any bytes."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import make_text, tiny_model_config, tiny_train_config
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import charrnn
from charrnn._io import _json_depth, parse_json
from charrnn.checkpoint import load_checkpoint, save_checkpoint
from charrnn.config import ModelConfig, TrainConfig
from charrnn.errors import CheckpointError, ConfigError, SessionFileError
from charrnn.generation.chat import ChatSession, ChatTemplate
from charrnn.generation.sampler import Sampler
from charrnn.model import CharRNN
from charrnn.tokenizer import REPLACEMENT_CHAR, UNK_ID, CharTokenizer
from charrnn.training.resume import merge_resume_config
from charrnn.training.trainer import Trainer, train

FAST = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any text at all: every Unicode category, with lone surrogates (category Cs) made common.
any_text = st.text(alphabet=st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=200)
# Text that UTF-8 can hold (no lone surrogates): what a corpus file can contain.
storable_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200)

CORPUS = make_text(seed=3, n_chars=2000)
CORPUS_TOKENIZER = CharTokenizer.from_text(CORPUS)


# --- the tokenizer ------------------------------------------------------------------------------


@FAST
@given(st.text(alphabet=st.sampled_from(CORPUS_TOKENIZER.chars[1:]), max_size=300))
def test_text_made_of_the_vocabulary_round_trips(text):
    ids = CORPUS_TOKENIZER.encode(text)
    assert len(ids) == len(text) and UNK_ID not in ids.tolist()
    assert CORPUS_TOKENIZER.decode(ids) == text


@FAST
@given(storable_text)
def test_a_vocabulary_built_from_any_text_round_trips_it_and_survives_tokenizer_json(text):
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    reloaded = CharTokenizer.load_bytes(tok.to_hf().to_str().encode("utf-8"))
    assert reloaded.chars == tok.chars
    assert reloaded.encode(text).tolist() == tok.encode(text).tolist()
    assert tok.to_hf().encode(text).ids == tok.encode(text).tolist()  # the tokenizers library agrees


@FAST
@given(any_text)
@example("a\ud800b\udfff\x00\U0010ffff")
def test_encoding_never_fails_and_unknowns_become_the_replacement_character(text):
    ids = CORPUS_TOKENIZER.encode(text)
    assert len(ids) == len(text)
    assert ((ids >= 0) & (ids < CORPUS_TOKENIZER.vocab_size)).all()
    expected = "".join(ch if ch in CORPUS_TOKENIZER else REPLACEMENT_CHAR for ch in text)
    assert CORPUS_TOKENIZER.decode(ids) == expected
    assert CORPUS_TOKENIZER.unknown_chars(text) == sorted({ch for ch in text if ch not in CORPUS_TOKENIZER})


@FAST
@given(any_text)
@example("a\ud800b\udfff\x00\U0010ffff")
def test_a_vocabulary_can_be_built_and_saved_from_any_text(text):
    tok = CharTokenizer.from_text(text)  # lone surrogates cannot be stored: they stay out, as <unk>
    saved = tok.to_hf().to_str()
    assert CharTokenizer.load_bytes(saved.encode("utf-8")).chars == tok.chars
    expected = "".join(REPLACEMENT_CHAR if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)
    assert tok.decode(tok.encode(text)) == expected


# --- the checkpoint loader on damaged bytes -------------------------------------------------------

FILES = ("config.json", "model.safetensors", "tokenizer.json", "training_state.safetensors", "training_state.json")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A small valid checkpoint with training state, never modified (examples work on copies)."""
    tok = CharTokenizer.from_text(CORPUS)
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=tok.vocab_size, n_layers=2, hidden_size=8, embedding_size=4, dropout=0.1))
    meta = {"step": 3, "train": TrainConfig(data="x.txt").to_dict()}
    tensors = {"rng.cpu": torch.get_rng_state(), "optim.0.exp_avg": torch.zeros(4, 4)}
    path = save_checkpoint(tmp_path_factory.mktemp("pristine") / "last", model, tok, meta, tensors, {"step": 3})
    load_checkpoint(path, with_training_state=True)
    return path


def _load_allowing_only_checkpoint_errors(path: Path) -> bool:
    """True if the checkpoint loaded; False on CheckpointError; any other exception fails the test."""
    try:
        load_checkpoint(path, with_training_state=True)
    except CheckpointError:
        return False
    return True


def _with_copy(pristine: Path, change) -> tuple[bool, Path]:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(shutil.copytree(pristine, Path(tmp) / "last"))
        change(ckpt)
        return _load_allowing_only_checkpoint_errors(ckpt)


damage = st.one_of(
    st.binary(max_size=3000).map(lambda new: ("replace", new)),
    st.integers(0, 10**6).map(lambda n: ("truncate", n)),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=8).map(lambda f: ("flip", f)),
)


def _apply(data: bytes, how) -> bytes:
    kind, arg = how
    if kind == "replace":
        return arg
    if kind == "truncate":
        return data[: arg % (len(data) + 1)]
    out = bytearray(data)
    for position, mask in arg:
        out[position % len(out)] ^= mask
    return bytes(out)


@FAST
@given(name=st.sampled_from(FILES), how=damage)
def test_the_loader_turns_any_damage_to_any_file_into_a_checkpoint_error(pristine, name, how):
    original = (pristine / name).read_bytes()
    damaged = _apply(original, how)
    loaded = _with_copy(pristine, lambda ckpt: (ckpt / name).write_bytes(damaged))
    if damaged != original and name != "config.json":
        assert not loaded  # every other file is checked against its sha256


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
config_paths = st.sampled_from(
    [
        ("format_version",),
        ("model",),
        ("files",),
        ("model", "vocab_size"),
        ("model", "cell"),
        ("model", "n_layers"),
        ("model", "hidden_size"),
        ("model", "embedding_size"),
        ("model", "dropout"),
        ("model", "extra"),
        ("files", "model.safetensors"),
        ("files", "tokenizer.json"),
        ("files", "training_state.json"),
        ("files", "training_state.safetensors"),
    ]
)


@FAST
@given(where=config_paths, value=json_values)
def test_the_loader_turns_any_value_in_config_json_into_a_checkpoint_error(pristine, where, value):
    def change(ckpt):
        config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        target = config
        for key in where[:-1]:
            target = target[key]
        target[where[-1]] = value
        (ckpt / "config.json").write_text(json.dumps(config), encoding="utf-8")

    _with_copy(pristine, change)  # loading it or a CheckpointError: nothing else


@FAST
@given(
    files=st.dictionaries(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=20).filter(
            lambda n: n not in FILES and n not in (".", "..")
        ),
        st.binary(max_size=500),
        min_size=1,
        max_size=4,
    )
)
def test_random_extra_files_in_a_checkpoint_are_ignored(pristine, files):
    def change(ckpt):
        for name, data in files.items():
            (ckpt / name).write_bytes(data)

    assert _with_copy(pristine, change)


@FAST
@given(files=st.dictionaries(st.sampled_from(FILES), st.binary(max_size=300), max_size=5))
def test_a_folder_of_random_files_is_a_checkpoint_error(files):
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        assert not _load_allowing_only_checkpoint_errors(Path(tmp))


@FAST
@given(
    train=st.one_of(
        json_values, st.dictionaries(st.sampled_from(["seq_len", "batch_size", "lr", "seed", "out", "progress"]), json_values)
    )
)
def test_resuming_from_any_training_settings_is_a_checkpoint_or_config_error(pristine, train):
    saved = load_checkpoint(pristine, with_training_state=True)
    saved.meta["train"] = {**saved.meta["train"], **train} if isinstance(train, dict) else train
    config = TrainConfig(data="x.txt", resume=str(pristine), max_iters=5)
    try:
        merge_resume_config(config, ModelConfig(), saved, explicit={"data", "resume", "max_iters"})
    except (CheckpointError, ConfigError):
        pass


# --- bounded JSON, rehashed training state, session files, tokenizer files -----------------------


@FAST
@given(value=json_values.filter(lambda v: v == v and "NaN" not in json.dumps(v) and "Infinity" not in json.dumps(v)))
def test_parse_json_reads_what_json_writes_within_its_bounds(value):
    try:
        assert parse_json(json.dumps(value)) == value
    except ValueError as exc:  # only the number bound refuses a value json wrote: integers past 40 digits
        assert "digits" in str(exc)


@FAST
@given(text=st.text(alphabet='[]{}",:0123456789.eE-+ntrufalsNIy\\' + "x", max_size=300) | any_text)
@example(text="[" * 5000)
@example(text='{"a": ' + "9" * 5000 + "}")
def test_parse_json_on_any_text_returns_or_raises_value_error(text):
    try:
        parse_json(text)
    except ValueError:
        pass


@FAST
@given(value=json_values)
def test_the_nesting_bound_counts_what_json_nests_and_ignores_brackets_in_strings(value):
    def depth(v):
        return 1 + max(map(depth, v.values() if isinstance(v, dict) else v), default=0) if isinstance(v, (dict, list)) else 0

    assert _json_depth(json.dumps(value)) == depth(value)
    assert _json_depth(json.dumps(value, ensure_ascii=False)) == depth(value)


def test_an_unterminated_string_of_escaped_quotes_is_refused_as_broken_json():
    # Once quadratic (a 128 KB body took 32 s to scan): the whole 1 MiB a server accepts is read once.
    body = '{"prompt": "' + '\\"' * (2**19 - 8)
    with pytest.raises(ValueError, match="Unterminated string"):
        parse_json(body)
    assert _json_depth('{"a": "\\\\", "b": ["[", {"c": "\\"]}"}]}') == 3


def _rehash(ckpt: Path, name: str) -> None:
    """Record the new sha256 of ``name`` in config.json, as a forger would."""
    config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    config["files"][name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    (ckpt / "config.json").write_text(json.dumps(config), encoding="utf-8")


@pytest.fixture(scope="module")
def resumable(tmp_path_factory) -> tuple[Path, Path]:
    """A real 'last' checkpoint of a tiny run, and its corpus."""
    root = tmp_path_factory.mktemp("resumable")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    result = train(tiny_train_config(corpus, root / "run", max_iters=4, eval_interval=4), tiny_model_config(hidden_size=8))
    return result.last, corpus


state_keys = st.sampled_from(
    ["step", "epoch", "index", "elapsed", "best_val_loss", "evals_without_improvement", "hidden_parts", "param_groups"]
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(state_keys, json_values, min_size=1, max_size=3))
def test_resuming_from_any_rehashed_training_state_is_a_checkpoint_error(resumable, tmp_path, changes):
    # A checksum recorded in config.json proves nothing: the values themselves are checked.
    last, corpus = resumable
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        ckpt = Path(shutil.copytree(last, Path(tmp) / "last"))
        state = json.loads((ckpt / "training_state.json").read_text(encoding="utf-8"))
        state.update(changes)
        (ckpt / "training_state.json").write_text(json.dumps(state), encoding="utf-8")
        _rehash(ckpt, "training_state.json")
        config = tiny_train_config(corpus, Path(tmp) / "out", max_iters=6, resume=str(ckpt))
        try:
            Trainer(config, tiny_model_config(hidden_size=8), callbacks=[]).run()
        except (CheckpointError, ConfigError):
            pass


@pytest.fixture(scope="module")
def session_file(resumable, tmp_path_factory) -> tuple[Sampler, bytes]:
    sampler = charrnn.load(resumable[0], device="cpu")
    session = sampler.chat(seed=1, template=ChatTemplate())
    session.send("ROMEO:")
    path = session.save(tmp_path_factory.mktemp("session") / "chat.session")
    return sampler, path.read_bytes()


def _session_with_metadata(data: bytes, change) -> bytes:
    """The session file with its JSON metadata changed, its tensors (and their checksum) kept."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    meta = json.loads(header["__metadata__"]["charrnn_chat"])
    change(meta)
    header["__metadata__"]["charrnn_chat"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + header_len :]


@FAST
@given(key=st.sampled_from(["seed", "options", "template", "preamble", "tail", "turns", "version", "format"]), value=json_values)
def test_loading_a_session_with_any_metadata_value_is_a_session_error(session_file, tmp_path_factory, key, value):
    sampler, data = session_file
    path = tmp_path_factory.mktemp("s") / "chat.session"
    path.write_bytes(_session_with_metadata(data, lambda meta: meta.__setitem__(key, value)))
    try:
        ChatSession.load(sampler, path)
    except SessionFileError:
        pass


@FAST
@given(how=damage)
def test_loading_any_damaged_session_file_is_a_session_error(session_file, tmp_path_factory, how):
    sampler, data = session_file
    path = tmp_path_factory.mktemp("s") / "chat.session"
    path.write_bytes(_apply(data, how))
    try:
        ChatSession.load(sampler, path)
    except SessionFileError:
        pass


@FAST
@given(vocab=st.one_of(json_values, st.dictionaries(st.text(max_size=3), json_values, max_size=6)), kind=json_values)
def test_any_tokenizer_json_loads_or_is_a_value_error(vocab, kind):
    raw = json.dumps({"model": {"type": "WordLevel" if kind is None else kind, "vocab": vocab}}).encode()
    try:
        CharTokenizer.load_bytes(raw)
    except ValueError:
        pass

"""Chat sessions with a turn template, constant cost, save/load, and the terminal chat loop."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import PYTHON
from safetensors import safe_open

import charrnn
from charrnn import ChatSession, ChatTemplate, ConfigError, PromptError, SessionFileError
from charrnn.cli.chat import main as chat_main
from charrnn.generation import sampler as sampling
from charrnn.generation.chat import _missing_separator

PLAY = ChatTemplate()  # ROMEO:\n ... \n\nJULIET:\n ... \n\n
M1, M2, M3 = "the cat sat", "a dog ran", "the king said"


def turn(message: str, after: str = "") -> str:
    """The play-script text of one user turn, written out by hand."""
    return after + "ROMEO:\n" + message + "\n\nJULIET:\n"


def state(session) -> dict[str, torch.Tensor]:
    """The conversation's current hidden state and logits (no generator, no start state)."""
    return {k: v for k, v in session.state_tensors().items() if k in ("logits", "h", "c")}


def assert_same_state(a, b, exact=True):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        if exact:
            assert torch.equal(sa[k], sb[k]), k
        else:  # stepped one character at a time vs read in one forward pass: rounding differs
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5, msg=k)


def raw_chat(sampler, **options):
    """A template-less session that stops where the play template does: the reference."""
    return sampler.chat(stop="\n\n", **options)


# --- the template ------------------------------------------------------------------------------


def test_template_defaults_are_a_play_script():
    assert (PLAY.user_prefix, PLAY.bot_prefix, PLAY.turn_separator) == ("ROMEO:\n", "JULIET:\n", "\n\n")
    assert PLAY.stops == ("\n\n",)
    assert ChatTemplate("USER: ", "BOT: ", "").stops == ("USER: ",)
    assert ChatTemplate.from_dict(PLAY.to_dict()) == PLAY


def test_templated_turns_read_exactly_the_play_script(sampler):
    a = sampler.chat(template=PLAY, seed=4, temperature=1.0, length=200)
    r1, r2, r3 = a.send(M1), a.send(M2), a.send(M3)
    b = raw_chat(sampler, seed=4, temperature=1.0, length=200)
    assert b.send(turn(M1)) == r1
    assert b.send(turn(M2, after="\n\n")) == r2
    assert b.send(turn(M3, after="\n\n")) == r3
    for reply in (r1, r2, r3):
        assert "\n\n" not in reply and len(reply) < 200  # each ended at the separator, which is not shown


def test_reply_length_and_stop_options(sampler):
    short = sampler.chat(template=PLAY, seed=1, temperature=1.0, length=7)
    assert all(len(short.send(m)) <= 7 for m in (M1, M2, M3))
    one_line = sampler.chat(template=PLAY, seed=1, temperature=1.0, length=80, stop="\n")
    assert all("\n" not in one_line.send(m) for m in (M1, M2, M3))
    assert one_line.config.stop == ("\n",)


@pytest.mark.parametrize(("tail", "missing"), [("", ""), ("mat.", "\n\n"), ("mat.\n", "\n"), ("mat.\n\n", ""), ("\n\n\n", "")])
def test_the_separator_is_completed_not_repeated(tail, missing):
    assert _missing_separator(tail, "\n\n") == missing


def test_a_reply_cut_at_a_newline_gets_only_the_rest_of_the_separator(sampler):
    a = sampler.chat(template=PLAY, temperature=0, length=20)
    a.feed("the cat sat.\n")  # the conversation now ends with half a separator
    assert a.turn_text(M1) == "\nROMEO:\nthe cat sat\n\nJULIET:\n"


def test_preamble_is_read_once_and_reset_returns_to_it(sampler, monkeypatch):
    preamble = "KING:\nthe queen said.\n\n"
    a = sampler.chat(template=PLAY, preamble=preamble, seed=5, temperature=1.0, length=50)
    assert a.turn_text(M1) == turn(M1)  # the preamble already ends with the separator
    r1, r2 = a.send(M1), a.send(M2)
    b = raw_chat(sampler, seed=5, temperature=1.0, length=50)
    assert b.send(preamble + turn(M1)) == r1

    fed = count_fed(monkeypatch, sampler)
    a.reset()
    assert fed == [] and a.turns == 0  # reset restores the saved state; it reads nothing
    after_preamble = raw_chat(sampler)
    after_preamble.feed(preamble)
    assert_same_state(a, after_preamble)
    assert [a.send(M1), a.send(M2)] == [r1, r2]


# --- streaming ---------------------------------------------------------------------------------


def test_stream_equals_send(sampler):
    a = sampler.chat(template=PLAY, seed=8, temperature=1.0, length=60)
    b = sampler.chat(template=PLAY, seed=8, temperature=1.0, length=60)
    for message in (M1, M2, M3):
        pieces = list(a.stream(message))
        assert len(pieces) > 1
        assert "".join(pieces) == b.send(message)


def test_a_stream_stopped_early_leaves_the_session_after_what_was_shown(sampler):
    a = sampler.chat(template=PLAY, temperature=0, length=40)
    pieces = a.stream(M1)
    shown = "".join(next(pieces) for _ in range(6))
    pieces.close()
    assert not shown.endswith("\n")
    b = raw_chat(sampler, temperature=0, length=40)
    b.feed(turn(M1) + shown)
    assert_same_state(a, b, exact=False)
    assert a.turn_text(M2) == turn(M2, after="\n\n")
    assert a.send(M2) == b.send(turn(M2, after="\n\n"))


# --- constant memory and cost --------------------------------------------------------------------


def count_fed(monkeypatch, sampler) -> list[int]:
    """Characters read through the model's forward pass, one entry per call."""
    fed: list[int] = []
    forward = sampler.model.forward

    def counting(idx, hidden=None):
        fed.append(idx.numel())
        return forward(idx, hidden)

    monkeypatch.setattr(sampler.model, "forward", counting)
    return fed


def test_each_turn_costs_its_own_characters_and_memory_stays_constant(sampler, monkeypatch, tmp_path):
    fed = count_fed(monkeypatch, sampler)
    stepped: list[int] = []
    sample_steps = sampling.sample_steps

    def counting_steps(stepper, logits, hidden, config, uniforms, every_state=True):
        stepped.append(uniforms.numel())
        return sample_steps(stepper, logits, hidden, config, uniforms, every_state)

    monkeypatch.setattr(sampling, "sample_steps", counting_steps)

    length = 30
    session = sampler.chat(template=PLAY, seed=1, temperature=1.0, length=length)
    most_read = len(turn(M1, after="\n\n"))
    snapshots = {}
    for t in range(1, 201):
        fed.clear()
        stepped.clear()
        reply = session.send(M1)
        # What this turn read and wrote, whatever came before: never the history.
        assert sum(fed) <= most_read, f"turn {t} read {sum(fed)} characters"
        assert len(reply) <= sum(stepped) <= length, f"turn {t} stepped {sum(stepped)} characters"
        if t in (1, 200):
            shapes = {k: (tuple(v.shape), v.dtype) for k, v in session.state_tensors().items()}
            attrs = sum(sys.getsizeof(v) for v in vars(session).values())
            size = session.save(tmp_path / f"turn{t}.session").stat().st_size
            snapshots[t] = shapes, attrs, size
    assert session.turns == 200
    (shapes1, attrs1, size1), (shapes200, attrs200, size200) = snapshots[1], snapshots[200]
    assert shapes200 == shapes1
    assert attrs200 <= attrs1 + 8  # at most a character more of the separator's tail
    assert abs(size200 - size1) <= 16  # the turn counter's digits, the tail, header padding


# --- saving and loading ----------------------------------------------------------------------------


def test_a_resumed_session_continues_exactly_as_an_unbroken_one(sampler, tmp_path):
    a = sampler.chat(template=PLAY, preamble="KING:\nthe queen said.\n\n", seed=11, temperature=1.0, top_k=20, length=50)
    before = [a.send(M1), a.send(M2)]
    a.configure(temperature=0.7)
    path = a.save(tmp_path / "chat.session")
    saved_tensors, next_turn = a.state_tensors(), a.turn_text(M3)
    unbroken = [a.send(M3), a.send(M1), a.send(M2)]

    b = ChatSession.load(sampler, path)
    assert (b.template, b.preamble, b.seed, b.config, b.turns) == (PLAY, a.preamble, 11, a.config, 2)
    loaded = b.state_tensors()
    assert loaded.keys() == saved_tensors.keys() == {"generator", "logits", "h", "c", "start_logits", "start_h", "start_c"}
    assert all(torch.equal(loaded[k], saved_tensors[k]) for k in loaded)
    assert b.turn_text(M3) == next_turn
    assert b.config.temperature == 0.7
    assert [b.send(M3), b.send(M1), b.send(M2)] == unbroken
    # Its start state came along too: after a reset both begin the same conversation again.
    a.reset()
    b.reset()
    assert [b.send(M1), b.send(M2)] == [a.send(M1), a.send(M2)]
    a.reset()
    a.configure(temperature=1.0)
    assert [a.send(M1), a.send(M2)] == before


def test_a_raw_session_with_nothing_read_saves_and_loads(sampler, tmp_path):
    a = sampler.chat(seed=2, length=30)
    b = ChatSession.load(sampler, a.save(tmp_path / "empty.session"))
    assert b.template is None and b.turns == 0
    assert b.send("the") == a.send("the")


def test_the_session_file_is_safetensors_with_json_and_no_pickle(sampler, tmp_path):
    a = sampler.chat(template=PLAY, seed=3, length=20)
    a.send(M1)
    path = a.save(tmp_path / "chat.session")
    assert not path.read_bytes().startswith(b"\x80")  # a pickle's first opcode
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["charrnn_chat"])
        keys = set(f.keys())
    assert keys == {"generator", "logits", "h", "c"}
    assert meta["template"] == PLAY.to_dict() and meta["seed"] == 3 and meta["turns"] == 1
    assert len(meta["fingerprint"]) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["chat.session"]  # no temporary file left


def _other_model(sampler) -> charrnn.Sampler:
    model = copy.deepcopy(sampler.model)
    with torch.no_grad():
        model.head.bias[0] += 1e-3
    return charrnn.Sampler(model, sampler.tokenizer, "cpu")


def test_loading_with_another_model_is_refused(sampler, tmp_path):
    path = sampler.chat(seed=1).save(tmp_path / "chat.session")
    with pytest.raises(SessionFileError, match=r"was saved from another model .*load it with the checkpoint it was saved with"):
        ChatSession.load(_other_model(sampler), path)


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), r"not found"),
        (lambda p: p.write_bytes(b""), r"is not a charrnn chat session"),
        (lambda p: p.write_bytes(b"\x80\x04\x95 pickled"), r"is not a charrnn chat session"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), r"is damaged|not a charrnn chat session"),
        (_flip_last_byte, r"is damaged: its tensors do not match their recorded sha256"),
        (lambda p: (p.unlink(), p.mkdir()), r"is a directory"),
    ],
    ids=["missing", "empty", "pickle", "truncated", "flipped-byte", "directory"],
)
def test_a_damaged_session_file_is_a_clear_error(sampler, tmp_path, damage, message):
    a = sampler.chat(template=PLAY, seed=1, length=10)
    a.send(M1)
    path = a.save(tmp_path / "chat.session")
    damage(path)
    with pytest.raises(SessionFileError, match=message):
        ChatSession.load(sampler, path)


def test_save_to_an_impossible_place_is_a_clear_error(sampler, tmp_path):
    with pytest.raises(SessionFileError, match=r"could not save the chat session to .*no/such/dir/x"):
        sampler.chat().save(tmp_path / "no" / "such" / "dir" / "x")


# --- bad input -------------------------------------------------------------------------------------


def test_bad_templates_and_options_are_config_errors(sampler):
    with pytest.raises(ConfigError, match=r"ChatTemplate.user_prefix must be a string"):
        ChatTemplate(user_prefix=3)
    with pytest.raises(ConfigError, match=r"the chat template uses characters the model never saw \('€'\)"):
        sampler.chat(template=ChatTemplate(user_prefix="€:\n"))
    with pytest.raises(ConfigError, match=r"template must be a ChatTemplate"):
        sampler.chat(template={"user_prefix": "A"})
    session = sampler.chat(template=PLAY, seed=1)
    with pytest.raises(ConfigError, match=r"seed is set when it is made"):
        session.send(M1, seed=3)
    with pytest.raises(ConfigError, match=r"temperature must be >= 0"):
        session.configure(temperature=-1)
    assert session.config.temperature == 0.8  # unchanged


def test_a_refused_message_leaves_the_session_as_it_was(sampler):
    a = sampler.chat(template=PLAY, seed=6, temperature=1.0, length=40)
    b = sampler.chat(template=PLAY, seed=6, temperature=1.0, length=40)
    with pytest.raises(PromptError, match=r"the message is made only of characters the model never saw"):
        a.send("ЖЖЖ")
    with pytest.raises(PromptError, match=r"the message has 100,001 characters; the limit is 100,000"):
        a.send("a" * 100_001)
    assert a.turns == 0
    assert a.send(M1) == b.send(M1)


def test_chat_session_names_stay_where_users_find_them(sampler):
    from charrnn.generation import chat
    from charrnn.generation import sampler as sampling

    assert charrnn.ChatSession is chat.ChatSession is sampling.ChatSession
    assert isinstance(sampler.chat(), charrnn.ChatSession)


# --- the terminal chat loop, as a user runs it --------------------------------------------------------


def run_chat(args, lines, env, cwd, timeout=120):
    return subprocess.run(
        [PYTHON, "-m", "charrnn", "chat", *map(str, args)],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def transcript(pairs) -> str:
    """The stdout of a piped chat: each line echoed after the ROMEO: prompt, each reply after JULIET:."""
    out = ""
    for line, reply in pairs:
        out += f"ROMEO: {line}\n" + (f"JULIET: {reply}\n" if reply is not None else "")
    return out


def test_terminal_chat_streams_the_library_replies_saves_and_resumes(trained_run, sampler, subprocess_env, tmp_path):
    saved = tmp_path / "romeo.session"
    args = ["--checkpoint", trained_run.best, "--device", "cpu", "--seed", "3", "--length", "40"]
    first = run_chat(args, [M1, "/temp 0.5", M2, f"/save {saved}", M3, "/quit"], subprocess_env, tmp_path)
    assert first.returncode == 0, first.stderr

    ref = sampler.chat(template=PLAY, seed=3, length=40, temperature=0.8)
    r1 = ref.send(M1)
    ref.configure(temperature=0.5)
    r2, r3 = ref.send(M2), ref.send(M3)
    assert first.stdout == transcript(
        [(M1, r1), ("/temp 0.5", None), (M2, r2), (f"/save {saved}", None), (M3, r3), ("/quit", None)]
    )
    assert "(temperature 0.5)" in first.stderr and f"(saved to {saved})" in first.stderr

    # A new process picks the conversation up where it was saved; /reset then starts afresh.
    second = run_chat(
        ["--checkpoint", trained_run.best, "--device", "cpu"], [f"/load {saved}", M3, "/reset", M1], subprocess_env, tmp_path
    )
    assert second.returncode == 0, second.stderr  # end of input ends the chat like /quit
    fresh = sampler.chat(template=PLAY, seed=3, length=40, temperature=0.5).send(M1)
    assert second.stdout == transcript([(f"/load {saved}", None), (M3, r3), ("/reset", None), (M1, fresh)]) + "ROMEO: \n"
    assert "(loaded" in second.stderr and "(conversation reset)" in second.stderr


def test_terminal_chat_bad_lines_print_errors_and_go_on(trained_run, subprocess_env, tmp_path):
    lines = ["/temp abc", "/temp -1", "/frobnicate", "/save", f"/load {tmp_path / 'nothing'}", "ЖЖЖ", "/help", M1, "/exit"]
    result = run_chat(["--checkpoint", trained_run.best, "--device", "cpu", "--seed", "1"], lines, subprocess_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 6, result.stderr
    for fragment, line in zip(
        [
            "/temp needs a number",
            "temperature must be >= 0",
            "unknown command /frobnicate",
            "/save needs a file name",
            "nothing not found",
            "made only of characters the model never saw",
        ],
        errors,
    ):
        assert fragment in line
    assert "/reset" in result.stderr  # the /help list
    assert f"ROMEO: {M1}\nJULIET: " in result.stdout  # after all that, it still answers


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--length", "-1"], "length must be >= 0"),
        (["--temperature", "-2"], "temperature must be >= 0"),
        (["--user-prefix", "€:"], "the chat template uses characters the model never saw"),
        (["--preamble-file", "/nonexistent/preamble.txt"], "cannot read --preamble-file"),
    ],
)
def test_terminal_chat_startup_mistakes_exit_2_with_one_line(trained_run, capsys, argv, fragment):
    assert chat_main(["--checkpoint", str(trained_run.best), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and "Traceback" not in err


def test_terminal_chat_with_a_missing_checkpoint_exits_2(subprocess_env, tmp_path):
    result = run_chat(["--checkpoint", tmp_path / "missing", "--device", "cpu"], ["hello"], subprocess_env, tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: checkpoint") and "Traceback" not in result.stderr
    assert "RuntimeWarning" not in result.stderr  # python -m charrnn chat runs the module once


def test_console_scripts_point_at_the_entry_points():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts["charrnn-chat"] == "charrnn.cli.chat:main"
    assert scripts["charrnn-serve"] == "charrnn.cli.serve:main"

"""Prompts from files and standard input; scores of files (charrnn sample --prompt-file, charrnn score FILE...)."""

from __future__ import annotations

import io
import json
import math

import pytest

from charrnn.cli import sample, score

PROMPT = "ROMEO:\nthe cat sat on the mat.\n\nJULIET:\nthe dog ran under the tree.\n\nKING:\n"


def _sample(argv, capsys, monkeypatch, stdin=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = sample.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_prompt_file_primes_exactly_as_the_same_text_given_inline(trained_run, sampler, tmp_path, capsys, monkeypatch):
    file = tmp_path / "prime.txt"
    file.write_text(PROMPT, encoding="utf-8")
    common = ["--checkpoint", str(trained_run.best), "--length", "80", "--seed", "4", "--device", "cpu", "--precision", "float32"]
    code, from_file, _ = _sample([*common, "--prompt-file", str(file)], capsys, monkeypatch)
    assert code == 0
    _, inline, _ = _sample([*common, "--prompt", PROMPT], capsys, monkeypatch)
    _, from_stdin, _ = _sample([*common, "--prompt", "-"], capsys, monkeypatch, stdin=PROMPT)
    assert from_file == inline == from_stdin
    assert from_file == PROMPT + sampler.generate(PROMPT, length=80, seed=4) + "\n"
    assert from_file.count("\n") >= 7  # a multi-line prime, kept whole


def test_prompt_file_errors_are_one_sentence(trained_run, tmp_path, capsys, monkeypatch):
    base = ["--checkpoint", str(trained_run.best), "--device", "cpu"]
    missing = tmp_path / "nope.txt"
    code, out, err = _sample([*base, "--prompt-file", str(missing)], capsys, monkeypatch)
    assert (code, out, err) == (2, "", f"error: cannot read --prompt-file {missing}: no such file\n")
    big = tmp_path / "big.txt"
    big.write_text("a" * 100_001, encoding="utf-8")
    code, out, err = _sample([*base, "--prompt-file", str(big)], capsys, monkeypatch)
    assert code == 2 and out == "" and "more than 100,000 characters" in err and "Traceback" not in err
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    code, _, err = _sample([*base, "--prompt-file", str(binary)], capsys, monkeypatch)
    assert code == 2 and "it is not UTF-8 text" in err
    with pytest.raises(SystemExit) as exc:  # argparse: the two prompts exclude each other
        sample.main([*base, "--prompt", "x", "--prompt-file", str(big)])
    assert exc.value.code == 2


def test_score_files_each_and_in_total_as_sampler_score(trained_run, sampler, tmp_path, capsys, corpus_text):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(corpus_text[:1500], encoding="utf-8")
    b.write_text("KING:\nthe queen said 42 things in the café.\n\n", encoding="utf-8")  # '4', '2', 'é' unseen
    assert score.main(["--checkpoint", str(trained_run.best), "--device", "cpu", str(a), str(b), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    first, second = report["files"]
    assert first["nats_per_char"] == pytest.approx(sampler.score(a.read_text()), abs=1e-6)
    with pytest.warns(UserWarning, match="never saw"):
        assert second["nats_per_char"] == pytest.approx(sampler.score(b.read_text()), abs=1e-6)
    assert first["bits_per_char"] == pytest.approx(first["nats_per_char"] / math.log(2))
    assert (first["unknown_count"], second["unknown_chars"], second["unknown_count"]) == (0, ["2", "4", "é"], 3)
    n1, n2 = first["chars"] - 1, second["chars"] - 1
    expected = (first["nats_per_char"] * n1 + second["nats_per_char"] * n2) / (n1 + n2)
    assert report["total"]["nats_per_char"] == pytest.approx(expected)
    assert report["total"]["chars"] == first["chars"] + second["chars"]

    assert score.main(["--checkpoint", str(trained_run.best), "--device", "cpu", str(a), str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{a}: 1,500 chars, {first['nats_per_char']:.4f} nats/char")
    assert lines[1].endswith("3 characters the model never saw ('24é') read as <unk>")
    assert lines[2].startswith(f"total (2 files): {report['total']['chars']:,} chars, {expected:.4f} nats/char")


def test_score_reads_standard_input(trained_run, sampler, capsys, monkeypatch, corpus_text):
    monkeypatch.setattr("sys.stdin", io.StringIO(corpus_text[:800]))
    assert score.main(["--checkpoint", str(trained_run.best), "--device", "cpu", "-"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"standard input: 800 chars, {sampler.score(corpus_text[:800]):.4f} nats/char")


def test_score_errors_name_the_file(trained_run, tmp_path, capsys):
    short, unseen = tmp_path / "short.txt", tmp_path / "unseen.txt"
    short.write_text("a", encoding="utf-8")
    unseen.write_text("0123456789", encoding="utf-8")
    base = ["--checkpoint", str(trained_run.best), "--device", "cpu"]
    assert score.main([*base, str(short)]) == 2
    assert f"error: {short} is too short to score" in capsys.readouterr().err
    assert score.main([*base, str(unseen)]) == 2
    assert f"error: {unseen} is made only of characters the model never saw" in capsys.readouterr().err
    assert score.main([*base, str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err

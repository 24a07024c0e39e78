"""Generation controls: log-probabilities and echo, structured outputs, best-of and beam search,
in the Python API, the CLI and the server alike."""

from __future__ import annotations

import json
import math
import re
import threading
import time

import pytest
import torch
from conftest import tiny_model_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import LIMITS, client, request

from charrnn.cli.sample import main as sample_main
from charrnn.errors import ConfigError
from charrnn.generation.constraints import ConstraintError
from charrnn.generation.sampler import Sampler
from charrnn.model import CharRNN
from charrnn.serve.settings import ServeConfig
from charrnn.serve.testing import ServerThread
from charrnn.tokenizer import CharTokenizer

PROMPT = "KING:\n"


@pytest.fixture(scope="module")
def json_sampler() -> Sampler:
    """An untrained model over printable ASCII and newlines: every JSON character is in its vocabulary."""
    torch.manual_seed(0)
    tokenizer = CharTokenizer(["\n", *(chr(c) for c in range(32, 127))])
    untrained = dict(input_dropout=0.0, embedding_dropout=0.0, weight_drop=0.0)  # what training would resolve
    model = CharRNN(tiny_model_config(vocab_size=len(tokenizer), n_layers=1, **untrained))
    return Sampler(model, tokenizer, dtype=torch.float32)


# --- log-probabilities ------------------------------------------------------------------------------


def test_logprobs_at_temperature_one_are_the_models_own(sampler):
    done = sampler.complete(PROMPT, length=40, temperature=1.0, seed=3, logprobs=3)
    assert "".join(r.char for r in done.logprobs) == done.text and len(done.text) == 40
    # Read back as text, each character has the log-probability the sampler reported for it.
    read = sampler.prompt_logprobs(PROMPT + done.text)[len(PROMPT) :]
    assert [r.logprob for r in done.logprobs] == pytest.approx([r.logprob for r in read], abs=1e-4)
    for record in done.logprobs:
        assert len(record.top) == 3 and [lp for _, lp in record.top] == sorted((lp for _, lp in record.top), reverse=True)
        assert record.logprob <= record.top[0][1] + 1e-12


def test_logprobs_follow_the_distribution_sampled_from(sampler):
    """top_k 2 leaves two characters: their probabilities sum to one, and nothing else is listed."""
    done = sampler.complete(PROMPT, length=20, temperature=0.7, top_k=2, seed=1, logprobs=5)
    for record in done.logprobs:
        assert len(record.top) <= 2 and sum(math.exp(lp) for _, lp in record.top) == pytest.approx(1.0)


def test_asking_for_logprobs_leaves_the_text_of_a_seed_as_it_was(sampler):
    for options in (dict(temperature=0.9, seed=11), dict(temperature=0.0), dict(top_p=0.8, seed=4)):
        assert sampler.complete(PROMPT, length=80, logprobs=2, **options).text == sampler.generate(PROMPT, length=80, **options)


def test_the_prompts_logprobs_are_its_score(sampler, corpus_text):
    text = corpus_text[:3000]  # longer than one read chunk: the state carries over between them
    records = sampler.prompt_logprobs(text, top=1)
    assert records[0] is None and len(records) == len(text)
    assert -sum(r.logprob for r in records[1:]) / (len(text) - 1) == pytest.approx(sampler.score(text), abs=1e-6)


# --- structured outputs ------------------------------------------------------------------------------

# (the pattern as llguidance reads it, the same as Python's re reads it)
PATTERNS = [r"(KING|ROMEO): [a-z]+\.", r"[a-z]{3,8}( [a-z]{2,6}){1,3}", r"(the|a) (cat|dog|bird) (sat|ran)\.", r"(a+)+b"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=st.sampled_from(PATTERNS), seed=st.integers(0, 2**32), temperature=st.sampled_from([0.0, 0.5, 1.0, 1.5]))
def test_every_constrained_text_matches_its_regex(sampler, pattern, seed, temperature):
    done = sampler.complete(PROMPT, regex=pattern, length=200, seed=seed, temperature=temperature)
    assert re.fullmatch(pattern, done.text), done.text
    assert done.finish_reason == "stop"


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "mood": {"enum": ["glad", "sad"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}


def _fits(value) -> bool:
    return (
        isinstance(value, dict)
        and set(value) <= set(SCHEMA["properties"])
        and {"name", "age", "mood"} <= set(value)
        and isinstance(value["name"], str)
        and len(value["name"]) <= 12
        and isinstance(value["age"], int)
        and 0 <= value["age"] <= 150
        and value["mood"] in ("glad", "sad")
        and all(isinstance(t, str) and len(t) <= 5 for t in value.get("tags", []))
        and len(value.get("tags", [])) <= 3
    )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), temperature=st.sampled_from([0.0, 0.7, 1.0, 2.0]))
def test_every_constrained_text_parses_and_fits_its_schema(json_sampler, seed, temperature):
    done = json_sampler.complete("", json_schema=SCHEMA, length=400, seed=seed, temperature=temperature)
    assert _fits(json.loads(done.text)), done.text
    assert done.finish_reason == "stop"


def test_a_choice_is_one_of_the_choices_and_a_short_budget_ends_on_length(sampler):
    for seed in range(5):
        assert sampler.generate(PROMPT, choices=["KING", "ROMEO", "JULIET"], seed=seed) in ("KING", "ROMEO", "JULIET")
    cut = sampler.complete(PROMPT, regex=r"[a-z ]{50}\.", length=10, seed=2)
    assert cut.finish_reason == "length" and len(cut.text) == 10 and re.fullmatch(r"[a-z ]{10}", cut.text)


def test_a_constrained_reply_leaves_the_context_right_after_its_text(sampler):
    context = sampler.read(PROMPT)
    reply = sampler.continue_from(context, regex=r"(the|a) (cat|dog)", seed=5)
    text = "".join(reply)
    after = sampler.read(text, context)
    assert torch.allclose(reply.context.logits, after.logits, atol=1e-5)


def test_generate_many_keeps_each_constrained_text_whole(sampler):
    texts = sampler.generate_many(PROMPT, 4, choices=["queen", "king"], seed=8, temperature=1.0)
    assert set(texts) <= {"queen", "king"} and len(texts) == 4


def test_a_constraint_the_vocabulary_cannot_write_is_refused_with_its_reason(sampler):
    with pytest.raises(ConfigError, match="choices needs 'Z'.*never saw"):
        sampler.generate(PROMPT, choices=["ok", "Zed"])
    with pytest.raises(ConfigError, match="cannot start with any character"):
        sampler.generate(PROMPT, regex="[0-9]+")  # no digits in the tiny corpus
    with pytest.raises(ConfigError, match="regex cannot be used: unclosed group"):
        sampler.generate(PROMPT, regex="(ab")
    with pytest.raises(ConfigError, match="regex and choices were both given"):
        sampler.generate(PROMPT, regex="a", choices=["b"])
    with pytest.raises(ConstraintError, match="cannot go on after 'the'"):
        sampler.generate(PROMPT, regex="the!")  # '!' never occurs in the corpus


def test_a_hostile_pattern_compiles_and_samples_quickly(sampler):
    start = time.perf_counter()
    assert sampler.generate(PROMPT, regex=r"((a+)+)+b", length=50, seed=1).endswith("b")
    # A pattern whose full automaton would need 2**400 states: llguidance builds only the states
    # the text reaches, so it samples at once.
    text = sampler.generate(PROMPT, regex=r"[ab]*a[ab]{400}" * 3, length=50, seed=1)
    assert len(text) == 50 and set(text) <= {"a", "b"}
    assert time.perf_counter() - start < 30  # generous: what matters is that it ends


# --- beam search ---------------------------------------------------------------------------------


def test_a_beam_of_one_is_greedy_and_reports_its_log_probability(sampler, trained_run):
    for s in (sampler, Sampler(sampler.model, sampler.tokenizer)):  # float32, and the default (int8 kernel) steps
        (found,) = s.beam_search(PROMPT, beam=1, length=60)
        assert found.text == s.generate(PROMPT, length=60, temperature=0)
    read = sampler.prompt_logprobs(PROMPT + found.text)[len(PROMPT) :]
    (found,) = sampler.beam_search(PROMPT, beam=1, length=60)
    assert found.logprob == pytest.approx(sum(r.logprob for r in read), abs=1e-3)


def test_a_wider_beam_finds_likelier_text_on_average(sampler):
    prompts = ["KING:\n", "ROMEO:\nthe ", "JULIET:\nsing ", "the cat ", "a bird ", "KING", "old ", "then "]
    greedy = [sampler.beam_search(p, beam=1, length=40)[0].logprob for p in prompts]
    wide = [sampler.beam_search(p, beam=6, length=40) for p in prompts]
    assert all(len(w) == 6 and [b.logprob for b in w] == sorted((b.logprob for b in w), reverse=True) for w in wide)
    assert sum(w[0].logprob for w in wide) / len(wide) >= sum(greedy) / len(greedy)


# --- the command line ------------------------------------------------------------------------------


def test_sample_prints_logprobs_as_json_lines_and_beams_with_theirs(trained_run, capsys):
    assert sample_main(["--checkpoint", str(trained_run.best), "--prompt", PROMPT, "--logprobs", "2", "--length", "12"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 12 and all(len(line["top"]) == 2 and line["logprob"] <= 0 for line in lines)
    assert sample_main(["--checkpoint", str(trained_run.best), "--prompt", PROMPT, "--beam", "2", "--length", "20"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- beam ") == 2 and "log-probability -" in out
    assert sample_main(["--checkpoint", str(trained_run.best), "--prompt", PROMPT, "--color", "--length", "10"]) == 0
    assert "\x1b[3" in capsys.readouterr().out


def test_sample_refuses_a_bad_constraint_with_a_sentence(trained_run, capsys, tmp_path):
    assert sample_main(["--checkpoint", str(trained_run.best), "--regex", "(ab"]) == 2
    assert "regex cannot be used: unclosed group" in capsys.readouterr().err
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"', encoding="utf-8")
    assert sample_main(["--checkpoint", str(trained_run.best), "--json-schema", str(schema)]) == 2
    assert "json_schema is not JSON" in capsys.readouterr().err


# --- the server --------------------------------------------------------------------------------------


@pytest.fixture
def server(sampler):
    with ServerThread(sampler, ServeConfig(**LIMITS, request_timeout=20.0, model_name="tiny")) as running:
        yield running


def test_an_echoed_prompts_logprobs_are_what_score_computes(server, sampler):
    """The evaluation harnesses' request: echo, logprobs 1, one token, greedy."""
    text = "KING:\nthe cat sat on the mat.\n"
    answer = client(server).completions.create(model="tiny", prompt=text, echo=True, logprobs=1, max_tokens=1, temperature=0)
    lp = answer.choices[0].logprobs
    assert answer.choices[0].text.startswith(text) and lp.tokens[: len(text)] == list(text)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == list(range(len(text) + 1))
    prompt_part = lp.token_logprobs[1 : len(text)]
    assert -sum(prompt_part) / len(prompt_part) == pytest.approx(sampler.score(text), abs=1e-6)
    # The generated character is greedy's: the likeliest in its top_logprobs.
    (best,) = lp.top_logprobs[-1].items()
    assert best[0] == lp.tokens[-1] and best[1] == pytest.approx(lp.token_logprobs[-1])


def test_completion_logprobs_stream_as_they_answer_whole(server):
    sdk = client(server)
    body = dict(model="tiny", prompt=PROMPT, max_tokens=30, seed=7, logprobs=3)
    whole = sdk.completions.create(**body).choices[0]
    chunks = [c.choices[0] for c in sdk.completions.create(**body, stream=True)]
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert "".join(tokens) == whole.text == "".join(whole.logprobs.tokens)
    assert offsets == whole.logprobs.text_offset == list(range(len(PROMPT), len(PROMPT) + len(whole.text)))


def test_chat_logprobs_in_openais_shape(server):
    answer = client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the cat"}], max_tokens=20, seed=2, logprobs=True, top_logprobs=4
    )
    choice = answer.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    assert all(len(t.top_logprobs) == 4 and t.bytes == list(t.token.encode()) for t in content)


def test_best_of_answers_the_likeliest_samples(server, sampler):
    body = dict(model="tiny", prompt=PROMPT, max_tokens=25, seed=40, temperature=1.0, logprobs=0)
    best = client(server).completions.create(**body, best_of=4, n=2)
    means = {}
    for j in range(4):
        done = sampler.complete(PROMPT, length=25, seed=40 + j, temperature=1.0, logprobs=0)
        means[done.text] = done.mean_logprob
    ranked = sorted(means, key=means.get, reverse=True)
    assert [c.text for c in best.choices] == ranked[:2]


def test_the_server_constrains_by_structured_outputs_and_response_format(server, json_sampler):
    sdk = client(server)
    picked = sdk.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=20, seed=3, extra_body={"structured_outputs": {"choice": ["KING", "ROMEO"]}}
    )
    assert picked.choices[0].text in ("KING", "ROMEO") and picked.choices[0].finish_reason == "stop"
    matched = sdk.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "the"}],
        max_tokens=40,
        extra_body={"structured_outputs": {"regex": "(the|a) [a-z]+"}},
    )
    assert re.fullmatch("(the|a) [a-z]+", matched.choices[0].message.content)
    with ServerThread(json_sampler, ServeConfig(**{**LIMITS, "max_length": 2000}, model_name="json")) as json_server:
        answer = client(json_server).chat.completions.create(
            model="json",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=300,
            seed=1,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
        )
        assert _fits(json.loads(answer.choices[0].message.content))
        status, _, raw = request(
            json_server,
            "POST",
            "/v1/completions",
            {"prompt": "", "max_tokens": 2000, "seed": 1, "response_format": {"type": "json_object"}},
        )
        (choice,) = json.loads(raw)["choices"]
        assert status == 200 and choice["finish_reason"] == "stop" and isinstance(json.loads(choice["text"]), dict)


def test_hostile_constraints_never_stall_the_server(json_sampler):
    """Nested quantifiers, an automaton of 2**400 states, a schema of 300 such patterns, and one
    over the size limit: each is answered (200, or a 400 naming its field) while /health goes on."""
    hard = {"type": "string", "pattern": "[ab]*a[ab]{400}"}
    wide = {"type": "object", "properties": {f"k{i}": hard for i in range(300)}, "required": [f"k{i}" for i in range(300)]}
    huge = {"type": "object", "properties": {f"key{i}": {"type": "integer"} for i in range(5000)}}
    bodies = [
        {"regex": "((a+)+)+b"},
        {"regex": "[ab]*a[ab]{400}" * 3},
        {"json": wide},
        {"json": huge},
    ]
    config = ServeConfig(**{**LIMITS, "max_body_bytes": 1 << 20, "max_concurrent": len(bodies)}, model_name="json")
    with ServerThread(json_sampler, config) as server:
        answers, threads = {}, []
        for k, body in enumerate(bodies):
            payload = {"prompt": "a", "max_tokens": 20, "structured_outputs": body}
            threads.append(
                threading.Thread(target=lambda k=k, p=payload: answers.update({k: request(server, "POST", "/v1/completions", p)}))
            )
            threads[-1].start()
        health = [request(server, "GET", "/health")[0] for _ in range(3)]
        for t in threads:
            t.join(60)
    assert health == [200, 200, 200]
    assert [answers[k][0] for k in range(3)] == [200, 200, 200]
    status, _, raw = answers[3]
    assert status == 400 and json.loads(raw)["error"]["param"] == "structured_outputs.json"
    assert "the limit is 100,000" in json.loads(raw)["error"]["message"]

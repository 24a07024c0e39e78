"""Sampling from a tiny trained model: determinism, decoding options, stop strings, chat, scoring."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from conftest import make_text

import charrnn
from charrnn import ConfigError, PromptError

PROMPT = "ROMEO:\n"


@pytest.fixture(params=["float32", "auto", "torch ops"])
def sampler(request, trained_run, monkeypatch):
    """Every behaviour below holds on each path: the fused kernel in float32, the default
    (int8 weights for one stream), and plain torch ops (where the kernel cannot be built)."""
    if request.param == "torch ops":
        monkeypatch.setenv("CHARRNN_KERNEL", "off")
    return charrnn.load(trained_run.best, device="cpu", dtype=None if request.param == "auto" else torch.float32)


def _first_fresh_ngram(text: str, n: int = 3, start: int = 3) -> int:
    """An index i >= start where text[i:i+n] occurs for the first time."""
    for i in range(start, len(text) - n):
        if text.find(text[i : i + n]) == i:
            return i
    raise AssertionError(f"no fresh {n}-gram in {text!r}")


# --- determinism and decoding options ------------------------------------------------------


def test_same_seed_same_sample(sampler):
    a = sampler.generate(PROMPT, length=200, temperature=1.0, seed=11)
    b = sampler.generate(PROMPT, length=200, temperature=1.0, seed=11)
    assert a == b
    assert len(a) == 200


def test_different_seeds_differ(sampler):
    samples = {sampler.generate(PROMPT, length=200, temperature=1.0, seed=s) for s in (1, 2, 3)}
    assert len(samples) == 3


def test_top_k_1_equals_greedy(sampler):
    greedy = sampler.generate(PROMPT, length=150, temperature=0)
    assert sampler.generate(PROMPT, length=150, temperature=1.0, top_k=1, seed=5) == greedy
    assert sampler.generate(PROMPT, length=150, temperature=2.5, top_k=1, seed=6) == greedy
    assert len(greedy) == 150


def test_tiny_top_p_equals_greedy(sampler):
    greedy = sampler.generate(PROMPT, length=100, temperature=0)
    assert sampler.generate(PROMPT, length=100, temperature=1.0, top_p=1e-6, seed=9) == greedy


def test_stream_joined_equals_generate(sampler):
    options = dict(length=120, temperature=0.9, top_k=10, top_p=0.95, seed=21)
    assert "".join(sampler.stream(PROMPT, **options)) == sampler.generate(PROMPT, **options)


# --- stop strings ----------------------------------------------------------------------------


def test_stop_string_ends_greedy_text_and_is_excluded(sampler):
    full = sampler.generate(PROMPT, length=150, temperature=0)
    i = _first_fresh_ngram(full)
    stop = full[i : i + 3]
    text = sampler.generate(PROMPT, length=150, temperature=0, stop=stop)
    assert text == full[:i]
    assert stop not in text
    assert "".join(sampler.stream(PROMPT, length=150, temperature=0, stop=stop)) == text


def test_stop_string_cuts_a_seeded_sample_at_the_same_place(sampler):
    options = dict(length=200, temperature=1.0, seed=8)
    full = sampler.generate(PROMPT, **options)
    i = _first_fresh_ngram(full, n=2, start=10)
    stop = full[i : i + 2]
    text = sampler.generate(PROMPT, stop=stop, **options)
    assert text == full[:i]  # the stop changes where the text ends, not what is drawn
    assert "".join(sampler.stream(PROMPT, stop=stop, **options)) == text


def test_several_stop_strings_end_at_the_earliest(sampler):
    full = sampler.generate(PROMPT, length=150, temperature=0)
    i = _first_fresh_ngram(full)
    j = _first_fresh_ngram(full, start=i + 1)
    stops = [full[j : j + 3], full[i : i + 3]]
    assert sampler.generate(PROMPT, length=150, temperature=0, stop=stops) == full[:i]


def test_partial_stop_match_is_released(sampler):
    """Text held back because it might begin a stop string comes out when the stop never completes."""
    options = dict(length=150, temperature=0.9, seed=4)
    full = sampler.generate(PROMPT, **options)
    stop = full[-1] + "\x07"  # starts like the last character, but \x07 is never generated
    assert sampler.generate(PROMPT, stop=stop, **options) == full
    assert "".join(sampler.stream(PROMPT, stop=[stop, "\x07\x07"], **options)) == full


# --- batches, next-character predictions, scores ---------------------------------------------


def test_generate_many_returns_num_samples_strings(sampler):
    texts = sampler.generate_many(PROMPT, num_samples=4, length=60, temperature=1.0, seed=2)
    assert isinstance(texts, list) and len(texts) == 4
    assert all(isinstance(t, str) and len(t) == 60 for t in texts)
    assert len(set(texts)) > 1
    assert sampler.generate_many(PROMPT, num_samples=4, length=60, temperature=1.0, seed=2) == texts


def test_generate_many_greedy_equals_generate(sampler):
    greedy = sampler.generate(PROMPT, length=80, temperature=0)
    assert sampler.generate_many(PROMPT, num_samples=3, length=80, temperature=0) == [greedy] * 3


def test_generate_many_with_stop_strings(sampler):
    greedy = sampler.generate(PROMPT, length=80, temperature=0)
    i = _first_fresh_ngram(greedy)
    texts = sampler.generate_many(PROMPT, num_samples=2, length=80, temperature=0, stop=greedy[i : i + 3])
    assert texts == [greedy[:i]] * 2


def test_predict_next(sampler):
    pairs = sampler.predict_next(PROMPT, k=5)
    assert len(pairs) == 5
    chars = [c for c, _ in pairs]
    probs = [p for _, p in pairs]
    assert all(isinstance(c, str) and len(c) == 1 for c in chars)
    assert len(set(chars)) == 5
    assert all(0 <= p <= 1 for p in probs)
    assert sum(probs) <= 1 + 1e-6
    assert probs == sorted(probs, reverse=True)
    # the likeliest next character is what greedy decoding writes
    assert chars[0] == sampler.generate(PROMPT, length=1, temperature=0)


def test_predict_next_all_characters_sum_to_one(sampler):
    pairs = sampler.predict_next(PROMPT, k=len(sampler.vocab))
    assert len(pairs) == len(sampler.vocab)
    assert sum(p for _, p in pairs) == pytest.approx(1.0, abs=1e-5)


def test_score_is_positive_finite_and_lower_for_training_like_text(sampler):
    like = make_text(seed=77, n_chars=600)
    rng = random.Random(0)
    chars = sampler.vocab[1:]  # every known character, <unk> excluded
    noise = "".join(rng.choice(chars) for _ in range(600))
    s_like, s_noise = sampler.score(like), sampler.score(noise)
    for s in (s_like, s_noise):
        assert isinstance(s, float) and math.isfinite(s) and s > 0
    assert s_like < s_noise
    assert s_like < 0.5 * s_noise


def test_score_needs_two_characters(sampler):
    with pytest.raises(PromptError, match="at least two characters"):
        sampler.score("a")


# --- bad options and prompts -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": -1}, r"temperature must be >= 0 \(0 means greedy\), got -1"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\] \(1 turns it off\), got 0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\] \(1 turns it off\), got 1.5"),
        ({"top_k": -1}, r"top_k must be >= 0 \(0 turns it off\), got -1"),
        ({"length": -5}, r"length must be >= 0, got -5"),
        ({"stop": ""}, r"stop strings must be non-empty strings"),
    ],
)
def test_bad_options_raise_config_error(sampler, options, message):
    with pytest.raises(ConfigError, match=message):
        sampler.generate(PROMPT, **options)
    with pytest.raises(ConfigError, match=message):
        sampler.generate_many(PROMPT, num_samples=2, **options)
    with pytest.raises(ConfigError, match=message):
        sampler.chat(**options)


def test_prompt_of_only_unseen_characters_raises(sampler):
    with pytest.raises(PromptError, match="made only of characters the model never saw"):
        sampler.generate("0123€€", length=10, temperature=0)
    with pytest.raises(PromptError, match="made only of characters the model never saw"):
        sampler.predict_next("€")


def test_prompt_with_some_unseen_characters_warns_and_generates(sampler):
    with pytest.warns(UserWarning, match=r"never saw '07€'.*<unk>"):
        text = sampler.generate("ROMEO 0 € 7:\n", length=40, temperature=0.8, seed=1)
    assert isinstance(text, str) and len(text) == 40


def test_known_prompt_does_not_warn(sampler):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler.generate(PROMPT, length=5, seed=1)


def test_empty_prompt_generates(sampler):
    assert len(sampler.generate("", length=30, temperature=0.8, seed=3)) == 30


# --- chat sessions -----------------------------------------------------------------------------

T1 = "JULIET:\nthe cat sat"
T2 = " on the mat.\n\nKING:\nthe"


def test_chat_state_carries_across_turns(sampler):
    a = sampler.chat(temperature=0, length=40)
    r1 = a.send(T1)
    r2 = a.send(T2)
    assert len(r1) == len(r2) == 40
    b = sampler.chat(temperature=0, length=40)
    assert b.send(T1 + r1 + T2) == r2


@pytest.mark.parametrize("stop_length", [2, 4])
@pytest.mark.parametrize("t2", [T2, "\n", ""], ids=["text", "newline", "nothing"])
def test_chat_with_stop_string_excludes_it_and_continues_after_the_reply(sampler, stop_length, t2):
    full = sampler.chat(temperature=0, length=80).send(T1)
    i = _first_fresh_ngram(full, n=stop_length)
    stop = full[i : i + stop_length]

    a = sampler.chat(temperature=0, length=80, stop=stop)
    r1 = a.send(T1)
    assert r1 == full[:i]
    assert stop not in r1
    r2 = a.send(t2)

    # The session stands right after r1: not inside or after the stop string.
    b = sampler.chat(temperature=0, length=80, stop=stop)
    assert b.send(T1 + r1 + t2) == r2
    # Without the stop, the same state writes r2 and goes on.
    assert sampler.chat(temperature=0, length=80).send(T1 + r1 + t2).startswith(r2)


def test_chat_stream_equals_send(sampler):
    a = sampler.chat(temperature=0, length=30)
    b = sampler.chat(temperature=0, length=30)
    assert "".join(a.stream(T1)) == b.send(T1)
    assert "".join(a.stream(T2)) == b.send(T2)


def test_chat_reset_forgets(sampler):
    a = sampler.chat(temperature=0, length=30)
    r1 = a.send(T1)
    a.send(T2)
    a.reset()
    assert a.send(T1) == r1
    a.reset()
    fresh = sampler.chat(temperature=0, length=30)
    assert a.send(T2) == fresh.send(T2)


def test_seeded_chat_repeats_after_reset(sampler):
    a = sampler.chat(seed=3, temperature=1.0, length=50)
    turns = [a.send(T1), a.send(T2)]
    a.reset()
    assert [a.send(T1), a.send(T2)] == turns
    b = sampler.chat(seed=3, temperature=1.0, length=50)
    assert [b.send(T1), b.send(T2)] == turns


def test_too_many_samples_at_once_is_a_clear_error(sampler):
    with pytest.raises(PromptError, match=r"num_samples must be from 1 to 4,096, got 5000"):
        sampler.generate_many("ab", 5000, length=5)
    with pytest.raises(PromptError, match=r"num_samples must be from 1 to 4,096, got 0"):
        sampler.generate_many("ab", 0, length=5)


def test_generate_many_without_stop_strings_equals_the_watched_path(sampler):
    """The batched fast path (no stop strings) samples exactly what the stop-watching loop does."""
    plain = sampler.generate_many("ab", 3, length=40, seed=11)
    watched = sampler.generate_many("ab", 3, length=40, seed=11, stop="\x00never")
    assert plain == watched and len(set(plain)) > 1 and all(len(t) == 40 for t in plain)

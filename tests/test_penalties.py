"""Repetition controls: OpenAI's frequency and presence penalties, Hugging Face's repetition penalty, DRY."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SAMPLE_SCRIPT, run_python

from charrnn.config import SampleConfig
from charrnn.errors import ConfigError
from charrnn.generation.processors import Penalties, pick_next


def _penalties(tokens, vocab=5, **config):
    p = Penalties(SampleConfig(**config), streams=1, vocab=vocab, device=torch.device("cpu"))
    for t in tokens:
        p.push(torch.tensor([t]))
    return p


def test_frequency_and_presence_penalties_follow_openais_formula():
    p = _penalties([1, 1, 2], frequency_penalty=0.5, presence_penalty=0.25)
    out = p.apply(torch.zeros(1, 5))
    # logit - count * frequency_penalty - (count > 0) * presence_penalty
    assert out.tolist() == [[0.0, -1.25, -0.75, 0.0, 0.0]]


def test_the_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_characters():
    p = _penalties([0, 3], repetition_penalty=2.0)
    out = p.apply(torch.tensor([[4.0, 4.0, -1.0, -1.0, 0.5]]))
    assert out.tolist() == [[2.0, 4.0, -1.0, -2.0, 0.5]]
    assert _penalties([0, 0, 0, 3], repetition_penalty=2.0, penalty_window=1).apply(torch.ones(1, 5)).tolist() == [
        [1.0, 1.0, 1.0, 0.5, 1.0]  # only the window's last character counts
    ]


def _dry_reference(text, vocab, multiplier, base, allowed):
    """DRY by its definition: for each earlier position, the repeat a candidate would continue."""
    penalty = [0.0] * vocab
    for j in range(1, len(text)):
        k = 0
        while k < j and text[j - 1 - k] == text[len(text) - 1 - k]:
            k += 1
        if k >= allowed:
            penalty[text[j]] = max(penalty[text[j]], multiplier * base ** min(k - allowed, 30))
    return penalty


@pytest.mark.parametrize("text", [[0, 1, 2, 0, 1], [3, 3, 3, 3], [0, 1, 2, 3, 0, 1, 2], [1, 2, 1, 2, 1, 2, 4, 1, 2]])
def test_dry_penalises_the_character_that_would_continue_a_repeat(text):
    p = _penalties(text, dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2)
    got = (-p.apply(torch.zeros(1, 5)))[0].tolist()
    assert got == pytest.approx(_dry_reference(text, 5, 0.8, 1.75, 2))
    # "0 1 2 0 1": '2' would make "0 1 2" again, a repeat of 2 characters before it
    if text == [0, 1, 2, 0, 1]:
        assert got == pytest.approx([0, 0, 0.8, 0, 0])


def test_penalties_off_change_nothing_and_same_seed_repeats(sampler):
    plain = sampler.generate("ROMEO:", length=200, temperature=0.8, seed=7)
    assert sampler.generate("ROMEO:", length=200, temperature=0.8, seed=7, presence_penalty=0.0) == plain
    penalised = sampler.generate("ROMEO:", length=200, temperature=0.8, seed=7, frequency_penalty=1.0)
    assert penalised != plain
    assert sampler.generate("ROMEO:", length=200, temperature=0.8, seed=7, frequency_penalty=1.0) == penalised


def test_a_penalised_run_picks_what_the_processors_say(sampler):
    """Greedy with DRY, step by step: each character is the argmax of the penalised logits."""
    config = SampleConfig(temperature=0, dry_multiplier=2.0, dry_allowed_length=1, length=60)
    text = sampler.generate(
        "the", **{k: getattr(config, k) for k in ("temperature", "dry_multiplier", "dry_allowed_length", "length")}
    )
    p = Penalties(config, 1, sampler.tokenizer.vocab_size, torch.device("cpu"))
    context = sampler.read("the")
    for ch in text:
        logits = context.logits
        expected = pick_next(p.apply(logits), config, torch.zeros(1, dtype=torch.float64))
        assert sampler.tokenizer.decode(expected.tolist()) == ch
        p.push(expected)
        context = sampler.read(ch, context)


def test_greedy_loops_are_broken_by_dry(sampler):
    def longest_repeat(text):
        return max(
            (n for n in range(1, len(text) // 2) if any(text[i : i + n] in text[i + n :] for i in range(len(text) - n))),
            default=0,
        )

    greedy = sampler.generate("ROMEO:", length=300, temperature=0)
    dry = sampler.generate("ROMEO:", length=300, temperature=0, dry_multiplier=1.0)
    assert longest_repeat(dry) < longest_repeat(greedy)


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty must be between -2 and 2"),
        ({"presence_penalty": -3}, "presence_penalty must be between -2 and 2"),
        ({"repetition_penalty": 0}, "repetition_penalty must be a positive number"),
        ({"repetition_penalty": math.inf}, "repetition_penalty must be a positive number"),
        ({"dry_multiplier": -1}, "dry_multiplier must be between 0 and 100"),
        ({"dry_base": 0.5}, "dry_base must be between 1 and 10"),
        ({"dry_allowed_length": 0}, "dry_allowed_length must be at least 1"),
        ({"penalty_window": 0}, "penalty_window must be between 1 and 100,000"),
    ],
)
def test_out_of_range_penalties_name_the_field(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        SampleConfig(**options)


def test_the_cli_takes_the_penalties_and_refuses_bad_ones(trained_run, subprocess_env, tmp_path):
    base = [
        SAMPLE_SCRIPT,
        "--checkpoint",
        trained_run.best,
        "--prompt",
        "ROMEO:",
        "--length",
        "80",
        "--seed",
        "3",
        "--device",
        "cpu",
    ]
    plain = run_python(base, subprocess_env, tmp_path)
    dry = run_python([*base, "--dry-multiplier", "1.5", "--frequency-penalty", "0.5"], subprocess_env, tmp_path)
    assert plain.returncode == dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("ROMEO:") and dry.stdout != plain.stdout
    bad = run_python([*base, "--presence-penalty", "9"], subprocess_env, tmp_path)
    assert bad.returncode == 2 and "presence_penalty must be between -2 and 2" in bad.stderr and "Traceback" not in bad.stderr

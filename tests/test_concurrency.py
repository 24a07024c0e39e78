"""One loaded Sampler, shared by threads: each call gives what it gives alone, and the weights stay put."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

import charrnn

THREADS = 8


def _work(sampler: charrnn.Sampler, seed: int) -> dict:
    """Everything one user might do with the shared sampler, from its own seed."""
    chat = sampler.chat(seed=seed, length=40, temperature=0.9)
    chat_replies = [chat.send("ROMEO:\n"), chat.send("\n\nJULIET:\n"), chat.send("the king", stop="\n")]
    return {
        "generate": sampler.generate("KING:\n", length=120, temperature=0.8, top_k=10, seed=seed),
        "stream": list(sampler.stream("the", length=60, top_p=0.9, seed=seed + 100)),
        "many": sampler.generate_many("a", 3, length=30, seed=seed + 200),
        "greedy": sampler.generate("queen ", length=30, temperature=0),
        "chat": chat_replies,
        "predict": sampler.predict_next("the ca", k=3),
        "score": sampler.score("the cat sat on the mat.\n"),
    }


def test_threads_sharing_one_sampler_get_exactly_the_sequential_results(trained_run):
    sampler = charrnn.load(trained_run.best, device="cpu")
    weights_before = {k: v.clone() for k, v in sampler.model.state_dict().items()}
    seeds = list(range(THREADS))
    expected = {seed: _work(sampler, seed) for seed in seeds}
    assert len({expected[s]["generate"] for s in seeds}) == THREADS  # the seeds really give different text

    start = threading.Barrier(THREADS)

    def in_thread(seed):
        start.wait()  # all threads at once, so that their steps interleave
        return seed, [_work(sampler, seed) for _ in range(2)]

    with ThreadPoolExecutor(THREADS) as pool:
        results = dict(pool.map(in_thread, seeds))
    for seed in seeds:
        for result in results[seed]:
            assert result == expected[seed], f"thread with seed {seed} got other results"

    weights_after = sampler.model.state_dict()
    assert weights_after.keys() == weights_before.keys()
    for name, value in weights_before.items():
        assert torch.equal(weights_after[name], value), f"{name} changed"
    assert not sampler.model.training

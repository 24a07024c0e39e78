"""The learning-rate schedule and the optimizer: warm-up, cosine decay over the budget, AdamW."""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig
from ..model import CharRNN


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` as ``progress`` goes 0 -> 1."""
    if step < config.warmup_iters:
        return config.lr * (step + 1) / config.warmup_iters
    p = min(max(progress, 0.0), 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * p))


def budget_progress(config: TrainConfig, step: int, elapsed: float) -> float:
    """How far the run is through its schedule, 0 -> 1 (steps or time, whichever is further)."""
    if config.lr_decay_iters:
        return step / config.lr_decay_iters
    by_steps = step / config.max_iters if config.max_iters else 0.0
    by_time = elapsed / config.max_time if config.max_time else 0.0
    return max(by_steps, by_time)


def make_optimizer(model: CharRNN, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not on biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99))

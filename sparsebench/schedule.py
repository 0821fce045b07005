"""Learning-rate schedule: linear warm-up, then cosine, linear or constant decay to ``min_lr``."""

from __future__ import annotations

import math

import torch

from sparsebench.config import TrainingConfig


def lr_at(step: int, t: TrainingConfig) -> float:
    """Learning rate of 1-based optimizer step ``step``."""
    min_lr = t.lr / 10 if t.min_lr is None else t.min_lr
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    if t.schedule == "constant" or t.steps <= t.warmup_steps:
        return t.lr
    progress = (step - t.warmup_steps) / (t.steps - t.warmup_steps)
    if t.schedule == "linear":
        return t.lr + (min_lr - t.lr) * progress
    return min_lr + 0.5 * (t.lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, t: TrainingConfig) -> float:
    """Set every group's lr; a group may carry ``lr_scale`` (e.g. mask scores added by a plugin)."""
    lr = lr_at(step, t)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr

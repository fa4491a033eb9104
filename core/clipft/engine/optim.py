"""Optimizers and learning-rate schedules (all state is checkpointable)."""
from __future__ import annotations

import math

import torch


def make_optimizer(groups, config) -> torch.optim.Optimizer:
    param_groups = [
        {"params": [p for _, p in g.params], "lr": g.lr, "weight_decay": g.weight_decay,
         "name": g.name}
        for g in groups
    ] or [{"params": [], "lr": 0.0, "weight_decay": 0.0, "name": "none"}]   # --epochs 0, nothing trains
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=config.momentum)
    return torch.optim.AdamW(param_groups, lr=param_groups[0]["lr"], betas=(0.9, 0.98), eps=1e-6)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of each group's base lr at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, total_steps: int, warmup: int, kind: str):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, kind))


def default_warmup(total_steps: int) -> int:
    return int(round(0.05 * total_steps))

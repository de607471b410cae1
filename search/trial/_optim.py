"""The optimizer over a trial's parameter groups and how its rate moves (warm-up, then the schedule)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from search.config import TrialConfig


OPTIMIZER_BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda groups, c: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.momentum > 0),
    "adamw": lambda groups, c: torch.optim.AdamW(groups, lr=c.lr),
    "adam": lambda groups, c: torch.optim.Adam(groups, lr=c.lr),
    "rmsprop": lambda groups, c: torch.optim.RMSprop(groups, lr=c.lr, momentum=c.momentum, eps=0.0316, alpha=0.9),
}


def build_optimizer(config: TrialConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The config's optimizer over parameter groups (trainable parameters only)."""
    return OPTIMIZER_BUILDERS[config.optimizer](groups, config)


def lr_multiplier(step: int, *, schedule: str, steps_per_epoch: int, warmup_steps: int, epochs: int) -> float:
    """Learning-rate multiplier at a training step (0-based): linear warm-up, then the schedule.

    "cosine" holds the rate through each epoch and lowers it between epochs, epoch e (0-based) of
    E at (1 + cos(pi e / E)) / 2, as the torchvision references step CosineAnnealingLR and timm
    its scheduler: the first epoch trains at the full rate however many follow. A cosine to zero
    at the last batch ("cosine_steps") spends half of a short trial's steps at a fraction of the
    rate: measured on spoken_digits (benchmarks/parity.py), one epoch of a full fine-tune at the
    rate of a plain loop ended 22 points below it. "constant" is the plain loop's.

    Args:
        step: optimizer steps taken so far.
        schedule: a `config.LR_SCHEDULES` name.
        steps_per_epoch: optimizer steps in one epoch.
        warmup_steps: steps of the linear warm-up (0: none).
        epochs: the trial's planned epochs.

    Returns:
        The factor of every parameter group's peak rate.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine_steps":
        return warmup_cosine(step, warmup_steps=warmup_steps, total_steps=epochs * steps_per_epoch)
    epoch = min(step // max(1, steps_per_epoch), max(0, epochs - 1))
    return 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))


def _head_lr(optimizer: torch.optim.Optimizer) -> float:
    """The head's current learning rate, the one a trial's `lr` names (`backbones.param_groups`
    puts the head first; the backbone's stages train at fractions of it)."""
    for group in optimizer.param_groups:
        if group.get("name") in ("head", "head.no_decay"):
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to 0 at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

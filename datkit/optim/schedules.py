"""Learning-rate schedules as a multiplier of the peak lr, stepped once per optimizer step.

``warmup_epochs`` of linear warm-up (Goyal et al. 2017), then ``constant``, ``step`` (multiply by
``gamma`` at each milestone epoch) or ``cosine`` (to ``min_lr_ratio`` at the end of training).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

SCHEDULES = ("constant", "step", "cosine")


def lr_multiplier(sched_cfg, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """``f(step) -> multiplier`` for ``torch.optim.lr_scheduler.LambdaLR``."""
    total = max(1, steps_per_epoch * epochs)
    warm = int(round(sched_cfg.warmup_epochs * steps_per_epoch))
    milestones = [int(round(m * steps_per_epoch)) for m in sched_cfg.milestones]

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if sched_cfg.name == "step":
            return sched_cfg.gamma ** sum(step >= m for m in milestones)
        if sched_cfg.name == "cosine":
            t = min(1.0, (step - warm) / max(1, total - warm))
            lo = sched_cfg.min_lr_ratio
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    return f


def build_scheduler(sched_cfg, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``lr_multiplier``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(sched_cfg, steps_per_epoch, epochs))


def eps_at(eps_max: float, warmup_epochs: float, epoch_progress: float) -> float:
    """Attack budget after a linear ramp from 0 over ``warmup_epochs`` (``epoch_progress`` in epochs)."""
    if warmup_epochs <= 0:
        return eps_max
    return eps_max * min(1.0, epoch_progress / warmup_epochs)

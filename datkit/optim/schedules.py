"""Learning-rate schedules as a multiplier of the peak lr, stepped once per optimizer step.

``warmup_epochs`` of linear warm-up (Goyal et al. 2017), then ``constant``, ``step`` (multiply by
``gamma`` at each milestone epoch) or ``cosine`` (to ``min_lr_ratio`` at the end of training).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from datkit.config import at_least, choices, raise_errors

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


def schedule_errors(s) -> list[str]:
    """Errors in a ``schedule`` section: a known schedule, warm-up, step milestones and decay, cosine's floor."""
    e: list[str] = []
    choices(e, "schedule.name", s.name, SCHEDULES)
    at_least(e, "schedule.warmup_epochs", s.warmup_epochs, 0.0)
    if not 0.0 < s.gamma <= 1.0:
        e.append(f"schedule.gamma={s.gamma!r} must be in (0, 1]")
    if list(s.milestones) != sorted(s.milestones) or any(m < 0 for m in s.milestones):
        e.append(f"schedule.milestones={list(s.milestones)!r} must be non-negative and increasing")
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        e.append(f"schedule.min_lr_ratio={s.min_lr_ratio!r} must be in [0, 1]")
    return e


def build_scheduler(sched_cfg, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``lr_multiplier`` (the ``schedule`` section is checked first: ``ConfigError`` naming the key)."""
    raise_errors(schedule_errors(sched_cfg))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(sched_cfg, steps_per_epoch, epochs))


def eps_at(eps_max: float, warmup_epochs: float, epoch_progress: float) -> float:
    """Attack budget after a linear ramp from 0 over ``warmup_epochs`` (``epoch_progress`` in epochs)."""
    if warmup_epochs <= 0:
        return eps_max
    return eps_max * min(1.0, epoch_progress / warmup_epochs)

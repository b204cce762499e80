"""The Method seam: what one training step minimizes.

The trainer asks a method for a loss on a (micro-)batch and asks the backend to reduce gradients;
neither knows the other's internals. Attacks run on the *unwrapped* model (``raw``); the loss's
forward passes go through the (possibly wrapped) ``model`` so that the backend sees them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..registry import Registry


@dataclass
class StepInfo:
    """Per-step context a method may need: the current attack budget (after the eps ramp)."""

    eps: float


class Method(ABC):
    """A training objective. ``cfg`` is the full run config (``cfg.method``, ``cfg.attack``)."""

    uses_attack: bool = True
    # True when the method reads the modules' weights directly (bound propagation), not only through forward():
    # a backend that partitions parameters outside forward (DeepSpeed ZeRO-3) refuses such a method at start-up
    reads_parameters: bool = False

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    @abstractmethod
    def loss(self, model: nn.Module, raw: nn.Module, x: torch.Tensor, y: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """Scalar loss (mean over the batch) whose gradient the trainer back-propagates."""

    # --- optional hooks (defaults: nothing to do) -------------------------------------------------
    def train_eps(self, progress: float) -> float:
        """The training budget after ``progress`` epochs (fractional): ``attack.eps`` ramped linearly over
        ``attack.eps_warmup_epochs``. Certified methods override it with their own schedule."""
        from ..optim import eps_at

        return eps_at(self.cfg.attack.eps, self.cfg.attack.eps_warmup_epochs, progress)

    def prepare_model(self, model: nn.Module) -> None:
        """Called once on the freshly built model, before it is wrapped for training (e.g. a special initialization)."""

    def eval_metrics(self) -> dict[str, Any]:
        """Extra evaluation columns: name -> an object with ``correct(model, x, y) -> int`` (see
        ``datkit.engine.evaluate.Metric``), evaluated next to TA and RA."""
        return {}


METHODS: Registry[Callable[..., Method]] = Registry("method")


def create_method(cfg) -> Method:
    """The method named by ``cfg.method.name``."""
    return METHODS.get(cfg.method.name)(cfg)

"""The Method seam: what one training step minimizes.

The trainer asks a method for a loss on a (micro-)batch and asks the backend to reduce gradients;
neither knows the other's internals. Attacks run on the *unwrapped* model (``raw``); the loss's
forward passes go through the (possibly wrapped) ``model`` so that the backend sees them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

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

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    @abstractmethod
    def loss(self, model: nn.Module, raw: nn.Module, x: torch.Tensor, y: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """Scalar loss (mean over the batch) whose gradient the trainer back-propagates."""


METHODS: Registry[Callable[..., Method]] = Registry("method")


def create_method(cfg) -> Method:
    """The method named by ``cfg.method.name``."""
    return METHODS.get(cfg.method.name)(cfg)

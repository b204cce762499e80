"""Standard (non-robust) training: cross-entropy on clean inputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import METHODS, Method, StepInfo


@METHODS.register("clean")
class CleanTraining(Method):
    """``loss = CE(f(x), y)``."""

    uses_attack = False

    def loss(self, model: nn.Module, raw: nn.Module, x: torch.Tensor, y: torch.Tensor, info: StepInfo) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

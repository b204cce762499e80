"""A user's own method and optimizer, given to datkit by import path (tests/test_plugins.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from datkit.methods import Method


class LabelSmoothingClean(Method):
    """Clean training with label smoothing: a method datkit does not ship."""

    uses_attack = False

    def loss(self, model, raw, x, y, info):
        return F.cross_entropy(model(x), y, label_smoothing=0.1)


def plain_sgd(params, lr: float, optim_cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr)

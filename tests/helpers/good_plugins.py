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


def dropout_mlp(num_classes: int, in_channels: int, image_size: int, hidden: int = 32, p: float = 0.5,
                **cnn_kwargs: object) -> torch.nn.Module:
    """A model whose forward draws from the global RNG (dropout): what a mid-epoch resume must restore per rank.
    ``cnn_kwargs`` (the tiny runs' ``model.kwargs.channels``) are not used."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size * image_size, hidden),
                               torch.nn.ReLU(), torch.nn.Dropout(p), torch.nn.Linear(hidden, num_classes))

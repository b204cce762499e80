"""``cnn_madry``: the MNIST CNN of Madry et al. 2018.

"Towards Deep Learning Models Resistant to Adversarial Attacks" (ICLR 2018), MNIST model:
two 5x5 conv layers (32 and 64 channels) each followed by 2x2 max-pooling, a 1024-unit hidden
layer and a linear classifier. No BatchNorm, so it is fast and deterministic on CPU.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from datkit.models.checks import two_stage_channels
from datkit.models.registry import MODELS


@MODELS.register("cnn_madry")
def cnn_madry(num_classes: int, in_channels: int, image_size: int,
              channels: Sequence[int] = (32, 64), hidden: int = 1024) -> nn.Sequential:
    """Conv5-ReLU-Pool2, Conv5-ReLU-Pool2, Linear-ReLU, Linear. ``image_size`` must be divisible by 4."""
    c1, c2 = two_stage_channels("cnn_madry", image_size, channels)
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * side * side, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )

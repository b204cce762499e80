"""``cnn_4layer`` and ``cnn_small``: the small strided CNN of Wong & Kolter (ICML 2018) and Wong et al. (ICLR 2020).

"Provable defenses against adversarial examples via the convex outer adversarial polytope" and
"Fast is better than free: revisiting adversarial training" use it for MNIST: two 4x4 stride-2 conv
layers (16 and 32 channels), a 100-unit hidden layer, a linear classifier. No pooling, no BatchNorm:
cheap enough for adversarial training on a CPU, and every layer is one a bound engine handles.

``cnn_small`` is the same network at twice the width (32/64 channels, 256 hidden units): datkit's
default MNIST model, the one the main job trains (robust accuracy needs capacity; this width is what
a 2-core CPU affords in the main job's 5-minute budget).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from datkit.models.checks import two_stage_channels
from datkit.models.registry import MODELS


def _strided_cnn(name: str, num_classes: int, in_channels: int, image_size: int, channels: Sequence[int],
                 hidden: int) -> nn.Sequential:
    c1, c2 = two_stage_channels(name, image_size, channels)
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * side * side, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@MODELS.register("cnn_4layer")
def cnn_4layer(num_classes: int, in_channels: int, image_size: int,
               channels: Sequence[int] = (16, 32), hidden: int = 100) -> nn.Sequential:
    """Wong et al.'s MNIST CNN: Conv4/2-ReLU, Conv4/2-ReLU, Linear-ReLU, Linear (``image_size`` % 4 == 0)."""
    return _strided_cnn("cnn_4layer", num_classes, in_channels, image_size, channels, hidden)


@MODELS.register("cnn_small")
def cnn_small(num_classes: int, in_channels: int, image_size: int,
              channels: Sequence[int] = (32, 64), hidden: int = 256) -> nn.Sequential:
    """datkit's default MNIST CNN: ``cnn_4layer`` at 32/64 channels and 256 hidden units."""
    return _strided_cnn("cnn_small", num_classes, in_channels, image_size, channels, hidden)

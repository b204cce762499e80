"""Argument checks shared by the two-stage MNIST CNNs (``cnn_madry``, ``cnn_4layer``, ``cnn_small``)."""
from __future__ import annotations

from collections.abc import Sequence


def two_stage_channels(name: str, image_size: int, channels: Sequence[int]) -> tuple[int, int]:
    """``(c1, c2)`` of a CNN that halves the image twice; ValueError naming ``name`` on bad arguments."""
    if image_size % 4 != 0:
        raise ValueError(f"model '{name}': image_size must be divisible by 4, got {image_size}")
    if len(channels) != 2:
        raise ValueError(f"model '{name}': channels must have 2 entries, got {tuple(channels)}")
    c1, c2 = (int(c) for c in channels)
    return c1, c2

"""Input normalization as part of the model.

Every datkit model takes inputs in [0, 1] pixel units and normalizes them itself, so a perturbation
budget ``eps`` means the same thing for every dataset, attack and certifier (the convention of
Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks", and of
RobustBench). A bound-propagation engine can treat :class:`Normalize` as a per-channel affine layer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _as_channel_tensor(values: Sequence[float], channels: int, what: str) -> torch.Tensor:
    vals = [float(v) for v in values]
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise ValueError(f"Normalize: {what} has {len(vals)} values but the input has {channels} channels")
    return torch.tensor(vals, dtype=torch.float32).view(1, channels, 1, 1)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with mean/std stored as (1, C, 1, 1) buffers.

    A length-1 ``mean``/``std`` is broadcast over the channels. ``in_channels`` (if given) fixes C;
    otherwise C is the longer of ``len(mean)`` and ``len(std)``. A length that is neither 1 nor C
    raises ``ValueError``, as does a non-positive std.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                 in_channels: int | None = None) -> None:
        super().__init__()
        mean, std = tuple(mean), tuple(std)
        if len(mean) == 0 or len(std) == 0:
            raise ValueError("Normalize: mean and std must be non-empty")
        channels = in_channels if in_channels is not None else max(len(mean), len(std))
        if channels < 1:
            raise ValueError(f"Normalize: in_channels must be >= 1, got {channels}")
        mean_t = _as_channel_tensor(mean, channels, "mean")
        std_t = _as_channel_tensor(std, channels, "std")
        if bool((std_t <= 0).any()):
            raise ValueError(f"Normalize: std must be positive, got {list(std)}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedModel(nn.Module):
    """``net(normalize(x))``: the model every datkit component sees; inputs are in [0, 1]."""

    def __init__(self, normalize: Normalize, net: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

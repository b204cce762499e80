"""``wide_resnet_8`` and ``wide_resnet_imagenet64``: the shallow wide ResNets of certified training.

The residual networks of Shi et al. 2021 ("Fast Certified Robust Training with Short Warmup",
NeurIPS 2021), after Zhang et al. 2020 / Xu et al. 2020: a 3x3 stem (16 channels) with BatchNorm, three
stages of one post-activation basic block each (Conv3x3-BN-ReLU-Conv3x3-BN, plus an identity or
Conv1x1-BN shortcut, then ReLU) at 16k / 32k / 64k channels (strides 1, 2, 2), no pooling, then
Linear(512)-BN-ReLU and the classifier. Widen factor k = 8 for MNIST / CIFAR-10 (``wide_resnet_8``)
and k = 10 for 64x64 TinyImageNet (``wide_resnet_imagenet64``). Every layer has a bound rule
(``datkit.certify.bounds``); the residual addition is traced from ``forward``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from datkit.models.registry import MODELS


def stride2_side(side: int) -> int:
    """Output side of a 3x3 convolution with stride 2 and padding 1."""
    return (side - 1) // 2 + 1


class BasicBlock(nn.Module):
    """Post-activation basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride), nn.BatchNorm2d(planes))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class WideResNetBN(nn.Module):
    """Stem, three stages of ``blocks[i]`` basic blocks (16k, 32k, 64k channels), dense 512 + BN, classifier."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, widen_factor: int,
                 blocks: Sequence[int], base_width: int = 16, dense: int = 512) -> None:
        super().__init__()
        if len(blocks) != 3 or any(int(b) < 1 for b in blocks):
            raise ValueError(f"wide ResNet: blocks must be 3 positive counts, got {tuple(blocks)}")
        if widen_factor < 1:
            raise ValueError(f"wide ResNet: widen_factor must be >= 1, got {widen_factor}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, base_width, 3, padding=1), nn.BatchNorm2d(base_width),
                                  nn.ReLU())
        layers, in_planes = [], base_width
        for i, (n, stride) in enumerate(zip(blocks, (1, 2, 2))):
            planes = base_width * widen_factor * 2 ** i
            for s in [stride] + [1] * (int(n) - 1):
                layers.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        side = stride2_side(stride2_side(image_size))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(in_planes * side * side, dense), nn.BatchNorm1d(dense),
                                  nn.ReLU(), nn.Linear(dense, num_classes))
        for m in self.modules():  # the authors' initialization (bounds.init=ibp replaces it)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


@MODELS.register("wide_resnet_8")
def wide_resnet_8(num_classes: int, in_channels: int, image_size: int, widen_factor: int = 8,
                  blocks: Sequence[int] = (1, 1, 1)) -> WideResNetBN:
    """Shi et al.'s WideResNet for MNIST / CIFAR-10: widen factor 8, one block per stage."""
    return WideResNetBN(num_classes, in_channels, image_size, int(widen_factor), blocks)


@MODELS.register("wide_resnet_imagenet64")
def wide_resnet_imagenet64(num_classes: int, in_channels: int, image_size: int, widen_factor: int = 10,
                           blocks: Sequence[int] = (1, 1, 1)) -> WideResNetBN:
    """Shi et al.'s WideResNet for 64x64 TinyImageNet: widen factor 10, one block per stage."""
    return WideResNetBN(num_classes, in_channels, image_size, int(widen_factor), blocks)

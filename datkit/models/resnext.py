"""``resnext`` and ``resnext_imagenet64``: the ResNeXt models of certified training.

ResNeXt (Xie et al., "Aggregated Residual Transformations for Deep Neural Networks", CVPR 2017) in the
BatchNorm form of Shi et al. 2021 ("Fast Certified Robust Training with Short Warmup"): a 3x3 stem
with BatchNorm, three stages (strides 1, 2, 2) of bottleneck blocks (Conv1x1-BN-ReLU, grouped
Conv3x3-BN-ReLU with ``cardinality`` groups, Conv1x1-BN to twice the group width, plus an identity or
Conv1x1-BN shortcut, then ReLU), the bottleneck width doubling after each stage, no pooling, then
Linear(512)-BN-ReLU and the classifier.

- ``resnext`` (CIFAR-10 / MNIST): blocks (1, 1, 1), cardinality 2, bottleneck width 32, stem 64;
- ``resnext_imagenet64`` (64x64 TinyImageNet): blocks (2, 2, 2), cardinality 2, bottleneck width 8, stem 16.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from datkit.models.registry import MODELS
from datkit.models.wide_resnet_bn import stride2_side

EXPANSION = 2


class ResNeXtBlock(nn.Module):
    """Bottleneck block with a grouped 3x3 convolution; output ``EXPANSION * cardinality * width`` channels."""

    def __init__(self, in_planes: int, cardinality: int, width: int, stride: int) -> None:
        super().__init__()
        group_width, out = cardinality * width, EXPANSION * cardinality * width
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(in_planes, group_width, 1), nn.BatchNorm2d(group_width), nn.ReLU()
        self.conv2 = nn.Conv2d(group_width, group_width, 3, stride=stride, padding=1, groups=cardinality)
        self.bn2, self.relu2 = nn.BatchNorm2d(group_width), nn.ReLU()
        self.conv3, self.bn3 = nn.Conv2d(group_width, out, 1), nn.BatchNorm2d(out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride=stride), nn.BatchNorm2d(out))
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.relu3(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNeXt(nn.Module):
    """Stem, three stages of ResNeXt blocks, dense 512 + BN, classifier (see the module docstring)."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, blocks: Sequence[int], cardinality: int,
                 bottleneck_width: int, stem_width: int, dense: int = 512) -> None:
        super().__init__()
        if len(blocks) != 3 or any(int(b) < 1 for b in blocks):
            raise ValueError(f"ResNeXt: blocks must be 3 positive counts, got {tuple(blocks)}")
        if cardinality < 1 or bottleneck_width < 1 or stem_width < 1:
            raise ValueError("ResNeXt: cardinality, bottleneck_width and stem_width must be >= 1")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_width, 3, padding=1), nn.BatchNorm2d(stem_width),
                                  nn.ReLU())
        layers, in_planes, width = [], stem_width, int(bottleneck_width)
        for n, stride in zip(blocks, (1, 2, 2)):
            for s in [stride] + [1] * (int(n) - 1):
                layers.append(ResNeXtBlock(in_planes, int(cardinality), width, s))
                in_planes = EXPANSION * int(cardinality) * width
            width *= EXPANSION
        self.layers = nn.Sequential(*layers)
        side = stride2_side(stride2_side(image_size))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(in_planes * side * side, dense), nn.BatchNorm1d(dense),
                                  nn.ReLU(), nn.Linear(dense, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


@MODELS.register("resnext")
def resnext(num_classes: int, in_channels: int, image_size: int, blocks: Sequence[int] = (1, 1, 1),
            cardinality: int = 2, bottleneck_width: int = 32, stem_width: int = 64) -> ResNeXt:
    """Shi et al.'s ResNeXt for CIFAR-10 (ResNeXt_2_32): one block per stage."""
    return ResNeXt(num_classes, in_channels, image_size, blocks, cardinality, bottleneck_width, stem_width)


@MODELS.register("resnext_imagenet64")
def resnext_imagenet64(num_classes: int, in_channels: int, image_size: int, blocks: Sequence[int] = (2, 2, 2),
                       cardinality: int = 2, bottleneck_width: int = 8, stem_width: int = 16) -> ResNeXt:
    """Shi et al.'s ResNeXt for 64x64 TinyImageNet: two blocks per stage."""
    return ResNeXt(num_classes, in_channels, image_size, blocks, cardinality, bottleneck_width, stem_width)

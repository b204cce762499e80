"""``preact_resnet18``: PreAct ResNet-18 of He et al. 2016.

"Identity Mappings in Deep Residual Networks" (He, Zhang, Ren, Sun; ECCV 2016), in the CIFAR-10
form used by Wong et al. 2020, "Fast is better than free: Revisiting adversarial training", and by
the DAT ("Distributed Adversarial Training", Zhang et al.) CIFAR experiments. Designed for 32x32
inputs; an adaptive average pool makes it accept any size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datkit.models.registry import MODELS


class PreActBlock(nn.Module):
    """BN-ReLU-Conv3x3-BN-ReLU-Conv3x3 with an identity (or 1x1 conv) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """3x3 stem, four stages of PreAct blocks (64/128/256/512), final BN-ReLU, avg pool, linear."""

    def __init__(self, num_blocks: tuple[int, int, int, int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.bn = nn.BatchNorm2d(512)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.linear(torch.flatten(self.pool(out), 1))


@MODELS.register("preact_resnet18")
def preact_resnet18(num_classes: int, in_channels: int, image_size: int) -> PreActResNet:
    """PreAct ResNet-18 (2-2-2-2 blocks); ``image_size`` is accepted for the common signature only."""
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)

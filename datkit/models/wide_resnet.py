"""``wide_resnet``: Wide Residual Networks of Zagoruyko & Komodakis 2016.

"Wide Residual Networks" (BMVC 2016). WRN-depth-k with pre-activation basic blocks; WRN-28-10 and
WRN-34-10 are the standard models of CIFAR-10 adversarial training (Madry et al. 2018, TRADES).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datkit.models.registry import MODELS


class WideBasic(nn.Module):
    """BN-ReLU-Conv3x3-(Dropout)-BN-ReLU-Conv3x3 with an identity (or 1x1 conv) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.dropout(self.conv1(out))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class WideResNet(nn.Module):
    """Stem conv (16), three stages of (depth-4)/6 blocks at 16k/32k/64k channels, BN-ReLU, pool, linear."""

    def __init__(self, depth: int, widen_factor: int, dropout: float, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError("model 'wide_resnet': depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, ...), "
                             f"got {depth}")
        if widen_factor < 1:
            raise ValueError(f"model 'wide_resnet': widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model 'wide_resnet': dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.in_planes = widths[0]
        self.block1 = self._make_stage(widths[1], n, 1, dropout)
        self.block2 = self._make_stage(widths[2], n, 2, dropout)
        self.block3 = self._make_stage(widths[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _make_stage(self, planes: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(WideBasic(self.in_planes, planes, s, dropout))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


@MODELS.register("wide_resnet")
def wide_resnet(num_classes: int, in_channels: int, image_size: int,
                depth: int = 28, widen_factor: int = 10, dropout: float = 0.0) -> WideResNet:
    """WRN-``depth``-``widen_factor``; ``(depth - 4) % 6`` must be 0, else ``ValueError``."""
    return WideResNet(depth, widen_factor, dropout, num_classes=num_classes, in_channels=in_channels)

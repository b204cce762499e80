"""``cnn_7layer_bn`` (and ``cnn_7layer_bn_imagenet64``): the CNN-7 with BatchNorm of Shi et al. 2021.

"Fast Certified Robust Training with Short Warmup" (Shi, Wang, Zhang, Yi, Hsieh; NeurIPS 2021),
the CNN-7 used for IBP/CROWN-IBP training on MNIST and CIFAR-10 (the authors' ``cnn_7layer_bn2``):
five 3x3 conv-BN-ReLU layers (width, width, 2w with stride 2, 2w, 2w), Linear(512)-BN1d-ReLU, Linear.
The TinyImageNet variant (their ``cnn_7layer_bn_imagenet``) also strides the fifth convolution, so a
64x64 input reaches the dense layer at 16x16. Built as a flat ``nn.Sequential`` of standard layers so
that a bound-propagation engine can walk it layer by layer.
"""
from __future__ import annotations

from torch import nn

from datkit.models.registry import MODELS


def _cnn7(num_classes: int, in_channels: int, image_size: int, width: int, linear_size: int,
          last_stride: int) -> nn.Sequential:
    w, w2 = int(width), 2 * int(width)
    side = (image_size + 1) // 2  # output side of the 3x3 / stride 2 / pad 1 conv
    if last_stride == 2:
        side = (side + 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 3, stride=1, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, w, 3, stride=1, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, w2, 3, stride=2, padding=1), nn.BatchNorm2d(w2), nn.ReLU(),
        nn.Conv2d(w2, w2, 3, stride=1, padding=1), nn.BatchNorm2d(w2), nn.ReLU(),
        nn.Conv2d(w2, w2, 3, stride=last_stride, padding=1), nn.BatchNorm2d(w2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(w2 * side * side, linear_size), nn.BatchNorm1d(linear_size), nn.ReLU(),
        nn.Linear(linear_size, num_classes),
    )


@MODELS.register("cnn_7layer_bn")
def cnn_7layer_bn(num_classes: int, in_channels: int, image_size: int,
                  width: int = 64, linear_size: int = 512) -> nn.Sequential:
    """Five 3x3 conv-BN-ReLU layers (width, width, 2w stride 2, 2w, 2w), Linear-BN1d-ReLU, Linear."""
    return _cnn7(num_classes, in_channels, image_size, width, linear_size, last_stride=1)


@MODELS.register("cnn_7layer_bn_imagenet64")
def cnn_7layer_bn_imagenet64(num_classes: int, in_channels: int, image_size: int,
                             width: int = 64, linear_size: int = 512) -> nn.Sequential:
    """As ``cnn_7layer_bn`` with the fifth convolution at stride 2 (64x64 -> 16x16 before the dense layer)."""
    return _cnn7(num_classes, in_channels, image_size, width, linear_size, last_stride=2)

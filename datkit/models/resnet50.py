"""``resnet50``: ResNet-50 of He et al. 2016, from torchvision.

"Deep Residual Learning for Image Recognition" (He, Zhang, Ren, Sun; CVPR 2016), the ImageNet model
of DAT / "Fast is better than free" ImageNet experiments. torchvision is imported lazily, only when
the model is built. For ``in_channels != 3`` the 7x7 stem conv is replaced.
"""
from __future__ import annotations

from torch import nn

from datkit.models.registry import MODELS


@MODELS.register("resnet50")
def resnet50(num_classes: int, in_channels: int, image_size: int,
             zero_init_residual: bool = False) -> nn.Module:
    """``torchvision.models.resnet50(weights=None, num_classes=num_classes)``, randomly initialised."""
    import torchvision  # lazy: torchvision is heavy to import

    model = torchvision.models.resnet50(weights=None, num_classes=num_classes,
                                        zero_init_residual=zero_init_residual)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model

"""IBP initialization of Shi et al. 2021 ("Fast Certified Robust Training with Short Warmup", Sec. 3.2).

With standard initializations the width of interval bounds grows exponentially with depth at
initialization. Drawing each weight of a Linear / Conv2d layer from ``N(0, sigma^2)`` with

    sigma = sqrt(2 * pi) / fan_in          (variance 2 * pi / fan_in^2)

keeps ``E[|W| r]`` equal to ``E[r]`` layer by layer (fan_in = in_features, or in_channels/groups * k_h * k_w),
so bounds neither explode nor vanish. As in the authors' code: the last (classification) layer keeps
its initialization, biases are untouched, and a layer whose input is a residual sum (directly or after a
ReLU) has its weights halved, because the sum of two branches doubles the interval width.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .bounds.graph import graph_of
from .bounds.rules_relu import ReLURule
from .bounds.rules_shape import AddRule


def ibp_init_std(layer: nn.Module) -> float:
    """``sqrt(2 pi) / fan_in`` of a Linear or Conv2d layer."""
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(layer.weight)
    return math.sqrt(2.0 * math.pi) / fan_in


@torch.no_grad()
def ibp_init(model: nn.Module) -> list[str]:
    """Re-initialize ``model`` in place (see the module docstring); returns the names of the layers changed."""
    graph = graph_of(model)
    steps = graph.bind(model)
    by_name = {s.name: s for s in steps}
    layers = [s for s in steps if isinstance(s.module, (nn.Linear, nn.Conv2d))]
    changed = []
    for step in layers[:-1]:
        step.module.weight.normal_(0.0, ibp_init_std(step.module))
        source = by_name.get(step.args[0].name) if step.args else None
        if source is not None and isinstance(source.rule, ReLURule):
            source = by_name.get(source.args[0].name)
        if source is not None and isinstance(source.rule, AddRule):
            step.module.weight.div_(2.0)
        changed.append(step.target)
    return changed

"""Bound rule of ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``).

IBP: ``[relu(l), relu(u)]`` (monotone). CROWN (Zhang et al. 2018), for a pre-activation ``h`` in
``[l, u]``: active neurons (``l >= 0``) are the identity, inactive ones (``u <= 0``) are zero, and an
unstable one (``l < 0 < u``) is relaxed to

    alpha * h  <=  relu(h)  <=  u / (u - l) * (h - l),

with the "adaptive" lower slope ``alpha = 1 if u > -l else 0`` (the choice of CROWN-IBP and of
auto_LiRPA's ``relu: adaptive`` that Shi et al. 2021 use). To lower-bound ``A @ relu(h)``, positive
entries of ``A`` take the lower line and negative entries the upper line.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .core import Interval, Rule, register_function, register_module


def relu_relaxation(iv: Interval) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lower slope, upper slope, upper intercept) of the CROWN relaxation of ReLU on ``iv``."""
    l, u = iv
    active, inactive = l >= 0, u <= 0
    unstable = ~(active | inactive)
    ratio = u / (u - l).clamp(min=1e-12)
    one, zero = torch.ones_like(l), torch.zeros_like(l)
    upper_slope = torch.where(active, one, torch.where(inactive, zero, ratio))
    upper_intercept = torch.where(unstable, -l * ratio, zero)
    lower_slope = torch.where(active, one, torch.where(inactive, zero, (u > -l).to(l.dtype)))
    return lower_slope, upper_slope, upper_intercept


@register_module(nn.ReLU)
@register_function(F.relu, torch.relu)
class ReLURule(Rule):
    """``max(h, 0)``."""

    def ibp(self, step, args, ctx):
        iv = args[0]
        return Interval(torch.relu(iv.lower), torch.relu(iv.upper))

    def backward(self, step, A, ctx):
        name = step.args[0].name
        lower_slope, upper_slope, upper_intercept = (t.unsqueeze(1) for t in relu_relaxation(ctx.interval(name)))
        positive = torch.relu(A)
        # A+ * lower + A- * upper, written with fewer passes over A (the slopes differ only where unstable)
        A_in = A * upper_slope + positive * (lower_slope - upper_slope)
        bias = (A - positive).flatten(2) @ upper_intercept.flatten(2).transpose(1, 2)  # A- (B, K, D) @ (B, D, 1)
        return [(name, A_in)], bias.squeeze(-1)

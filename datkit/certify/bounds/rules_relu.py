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


def relaxation_parts(iv: Interval) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lower line is the identity (bool), upper slope, min(l, 0))``: the CROWN relaxation of ReLU on ``iv``
    with the fewest passes over the activations (the intercept of the upper line is ``-min(l, 0) * slope``).

    With ``u+ = max(u, 0)`` and ``l- = min(l, 0)`` the upper slope ``u+ / (u+ - l-)`` is 1 when active, 0 when
    inactive and ``u / (u - l)`` when unstable, and its intercept ``-l- * slope`` is 0 unless unstable. The
    adaptive lower slope ``1 if u > -l else 0`` is ``center > 0``: true when active, false when inactive
    (``l = u = 0``, where any line is exact, takes slope 0)."""
    l, u = iv
    u_pos, l_neg = torch.relu(u), torch.clamp(l, max=0.0)
    upper_slope = u_pos / (u_pos - l_neg).clamp(min=1e-12)
    return iv.center > 0, upper_slope, l_neg


def relu_relaxation(iv: Interval) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lower slope, upper slope, upper intercept) of the CROWN relaxation of ReLU on ``iv``."""
    lower, upper_slope, l_neg = relaxation_parts(iv)
    return lower.to(upper_slope.dtype), upper_slope, -l_neg * upper_slope


@register_module(nn.ReLU)
@register_function(F.relu, torch.relu)
class ReLURule(Rule):
    """``max(h, 0)``."""

    def ibp(self, step, args, ctx):
        iv = args[0]
        return Interval(torch.relu(iv.lower), torch.relu(iv.upper))

    def backward(self, step, A, ctx):
        name = step.args[0].name
        key = ("relu relaxation", name)
        if key not in ctx.cache:  # shared by every backward pass over the same state
            ctx.cache[key] = tuple(t.unsqueeze(1) for t in relaxation_parts(ctx.interval(name)))
        lower, upper_slope, l_neg = ctx.cache[key]
        # A+ * lower line + A- * upper line, in few passes over A: t = A- * slope is reused by the intercept term
        negative = A.clamp(max=0.0)
        t = negative * upper_slope
        A_in = (A - negative) * lower + t
        bias = -(t.flatten(2) @ l_neg.flatten(2).transpose(1, 2)).squeeze(-1)  # (B, K, D) @ (B, D, 1)
        return [(name, A_in)], bias

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


class ReLUBackwardStep(torch.autograd.Function):
    """``A @ relu(h) >= A_in @ h + bias`` for ``h`` in ``[l, u]`` as ONE autograd node with a hand-written gradient.

    The same values (and gradients, also through the relaxation's dependence on ``l`` and ``u``) as composing
    :func:`relaxation_parts` with ``A_in = A+ * lower + A- * slope``, ``bias = A- . (-l- * slope)`` from torch
    ops, in fewer passes over the activations: autograd would save and revisit a dozen intermediates (the
    clamps' and the division's backward alone cost more than the forward). ``tests/test_loss_fusion.py`` checks
    values and gradients against the composed version (and ``torch.autograd.gradcheck``).
    Inputs: ``A`` (B, K, ...), ``l``, ``u+ = relu(u)`` (B, ...; the IBP pass's upper bound of the ReLU's output, whose
    own backward then masks ``u <= 0``), ``lower`` (B, ...) 1.0 where the lower line is the identity."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, l: torch.Tensor, u_pos: torch.Tensor, lower: torch.Tensor):  # type: ignore[override]
        l_neg = torch.clamp(l, max=0.0)
        den = (u_pos - l_neg).clamp_(min=1e-12)
        slope = u_pos / den
        negative = A.clamp(max=0.0)
        t = negative * slope.unsqueeze(1)
        A_in = (A - negative).mul_(lower.unsqueeze(1)).add_(t)
        bias = -(t.flatten(2) @ l_neg.flatten(1).unsqueeze(-1)).squeeze(-1)  # (B, K, D) @ (B, D, 1)
        ctx.save_for_backward(negative, t, slope, l_neg, den, lower)
        return A_in, bias

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_A_in: torch.Tensor, g_bias: torch.Tensor):  # type: ignore[override]
        negative, t, slope, l_neg, den, lower = ctx.saved_tensors
        g_A = g_l = g_u = None
        gb = g_bias.reshape(g_bias.shape + (1,) * (negative.dim() - 2))
        slope1 = slope.unsqueeze(1)
        q = torch.addcmul(g_A_in, gb, l_neg.unsqueeze(1), value=-1.0)  # what reaches A- (through A_in and the bias)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            k = _sum_rows(negative * q).div_(den)  # d/d slope, over (u+ - l-)
            # slope = u+ / (u+ - l-): d/du+ = (1 - slope) / den, d/dl- = slope / den; the bias also reads l- directly.
            # The mask l < 0 as a 0/1 float (torch.where and bool operands cost several multiplications on CPU)
            g_u = torch.addcmul(k, k, slope, value=-1.0)
            g_l = _sum_rows(t * gb).neg_().addcmul_(k, slope).mul_(_float_mask(torch.lt, l_neg))
        if ctx.needs_input_grad[0]:  # A > 0: the lower line; A < 0: the upper line and its intercept
            g_A = (g_A_in * lower.unsqueeze(1)).lerp_(q.mul_(slope1), _float_mask(torch.lt, negative))
        return g_A, g_l, g_u, None


def _float_mask(compare, t: torch.Tensor) -> torch.Tensor:
    """``compare(t, 0)`` as 0/1 in ``t``'s dtype, in one pass."""
    return compare(t, 0, out=torch.empty_like(t))


def _sum_rows(t: torch.Tensor) -> torch.Tensor:
    """Sum over the rows (dimension 1); a view when there is one row (loss fusion)."""
    return t.squeeze(1) if t.shape[1] == 1 else t.sum(1)


@register_module(nn.ReLU)
@register_function(F.relu, torch.relu)
class ReLURule(Rule):
    """``max(h, 0)``."""

    def ibp(self, step, args, ctx):
        iv = args[0]
        return Interval(torch.relu(iv.lower), torch.relu(iv.upper))

    def backward(self, step, A, ctx):
        name = step.args[0].name
        iv = ctx.interval(name)
        lower = _float_mask(torch.gt, iv.center.detach())
        A_in, bias = ReLUBackwardStep.apply(A, iv.lower, ctx.interval(step.name).upper, lower)  # relu(u) from IBP
        return [(name, A_in)], bias

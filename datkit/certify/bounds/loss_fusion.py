"""Loss fusion: an upper bound of the robust cross-entropy with ONE backward row (CROWN-IBP training).

Xu et al., "Automatic Perturbation Analysis for Scalable Certified Robustness and Beyond" (NeurIPS 2020),
Sec. "Loss fusion" (used by Shi et al. 2021's CROWN-IBP training through auto_LiRPA): instead of bounding
the ``K - 1`` margins and taking the cross-entropy of their bounds, bound the loss itself,

    CE(z(x'), y) = log S(x'),   S(x') = sum_j exp(d_j(x')),   d_j = z_j - z_y   (d_y = 0),

over the input box ``{|x' - x|_inf <= eps} ∩ [0, 1]^d``. With the IBP bounds ``l_j <= d_j <= u_j`` (minus
the margin bounds: the IBP pass with the specification matrix gives both), ``exp`` is convex, so on
``[l_j, u_j]`` it lies below its chord:

    exp(d_j) <= exp(l_j) + a_j (d_j - l_j),   a_j = (exp(u_j) - exp(l_j)) / (u_j - l_j) >= 0,

hence ``S <= 1 + sum_j (exp(l_j) - a_j l_j) + A . z`` with the single row ``A = sum_{j != y} a_j (e_j - e_y)``
at the logits, whose upper bound over the box is one CROWN backward pass (with IBP intermediates:
CROWN-IBP). CROWN-IBP's mixture becomes ``ub = beta * ub_crown + (1 - beta) * ub_ibp`` with
``ub_ibp = 1 + sum_j exp(u_j)``, a convex combination of two upper bounds of ``S`` (as auto_LiRPA's
``simple_training`` example), and the loss is ``mean(log ub)``. At ``beta = 0`` it is exactly the
cross-entropy of the IBP margin bounds (:func:`datkit.methods.certified.robust_cross_entropy`).

Numerics (any finite ``l <= u``, e.g. bounds in the thousands at large eps): everything is scaled by
``exp(-M)`` with ``M = max(0, max_j u_j)`` and the log is taken as ``M + log(ub exp(-M))``; the scaled
slope is ``exp(u_j - M) * (1 - exp(-w)) / w`` with ``w = u_j - l_j`` (``-expm1(-w) / w``, a Taylor
series for ``w < 1e-3`` so that its value and gradient stay exact as ``w -> 0``); the chord is written
around ``u_j`` (``exp(u_j) + a_j (d_j - u_j)``) so that its largest terms carry no cancellation; and
``ub`` is clamped to ``>= 1`` (``S >= 1`` everywhere, so the clamp only absorbs rounding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .api import bound_state, num_classes_of, spec_matrix
from .batchnorm import Stats
from .propagate import BoundState, backward_pass

SERIES_BELOW = 1e-3  # w below this: the chord slope's factor (1 - exp(-w)) / w by its Taylor series


def chord_factor(w: torch.Tensor) -> torch.Tensor:
    """``(1 - exp(-w)) / w`` for ``w >= 0`` (1 at ``w = 0``), accurate with finite gradients everywhere."""
    big = w.clamp(min=SERIES_BELOW)
    series = 1.0 - w * (0.5 - w * (1.0 / 6.0 - w / 24.0))
    return torch.where(w < SERIES_BELOW, series, -torch.expm1(-big) / big)


def logit_row(slopes: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``A = sum_{j != y} a_j (e_j - e_y)`` of shape ``(B, 1, num_classes)`` from the slopes ``a`` (B, classes - 1)
    ordered as the rows of :func:`~datkit.certify.bounds.api.spec_matrix` (every class but ``y``, ascending)."""
    B = len(y)
    others = torch.arange(num_classes, device=y.device).expand(B, -1)
    others = others[others != y.unsqueeze(1)].view(B, num_classes - 1)
    A = torch.zeros(B, num_classes, dtype=slopes.dtype, device=slopes.device)
    A = A.scatter(1, others, slopes).scatter(1, y.unsqueeze(1), -slopes.sum(1, keepdim=True))
    return A.unsqueeze(1)


def fused_upper(state: BoundState, y: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, ub')`` per example with ``log ub = M + log ub'``: the scaled upper bound ``ub' = ub exp(-M)`` of ``S``.

    ``state`` is the IBP state of the specification ``C`` (rows ``e_y - e_j``), so ``state.output`` bounds the
    margins and ``d_j = -margin_j``. ``beta = 0`` runs no backward pass."""
    margins = state.output
    u, l = -margins.lower, -margins.upper  # bounds of d_j = z_j - z_y, j != y: (B, K - 1)
    M = u.max(1).values.clamp(min=0.0)
    eu = torch.exp(u - M.unsqueeze(1))  # exp(u_j - M) <= 1
    ey = torch.exp(-M)  # the j = y term, exp(0 - M)
    ub_ibp = ey + eu.sum(1)
    if beta <= 0:
        return M, ub_ibp
    a = eu * chord_factor((u - l).clamp(min=0.0))  # scaled chord slopes, >= 0
    A = logit_row(a, y, margins.lower.shape[1] + 1)
    # chord around u: exp(d) <= exp(u) + a (d - u); summed over j: sum_j (exp(u_j) - a_j u_j) + A . z
    linear_ub = -backward_pass(state, -A).squeeze(1)  # CROWN-IBP upper bound of A . z over the box (one row)
    ub_crown = ey + (eu - a * u).sum(1) + linear_ub
    return M, (ub_crown if beta >= 1 else beta * ub_crown + (1.0 - beta) * ub_ibp)


def fused_bound(state: BoundState, y: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Per-example upper bounds ``log ub`` (B,) of the worst-case cross-entropy over the box, with
    ``ub = beta * ub_crown + (1 - beta) * ub_ibp`` (see the module docstring); ``beta`` in [0, 1]."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1]; got {beta!r}")
    M, ub = fused_upper(state, y, beta)
    floor = torch.exp(-M).clamp(min=torch.finfo(ub.dtype).tiny)  # S >= 1, i.e. ub' >= exp(-M): absorbs rounding
    return M + torch.log(torch.maximum(ub, floor))


def fused_cross_entropy(state: BoundState, y: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """The loss: :func:`fused_bound` averaged over the batch."""
    return fused_bound(state, y, beta).mean()


@dataclass
class FusedLoss:
    """The fused robust cross-entropy bound (a scalar) and the IBP state it came from (the regularizers' intervals)."""

    loss: torch.Tensor
    state: BoundState


def fused_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, beta: float = 1.0, *,
               batch_stats: Stats | None = None, num_classes: int | None = None) -> FusedLoss:
    """:func:`fused_cross_entropy` of ``model`` at ``(x, y)`` over the eps-box: one IBP pass (with the margins'
    specification matrix) and, for ``beta > 0``, one backward pass of a single row."""
    C = spec_matrix(y, num_classes or num_classes_of(model)).to(x.dtype)
    state = bound_state(model, x, eps, C, batch_stats)
    return FusedLoss(fused_cross_entropy(state, y, beta), state)

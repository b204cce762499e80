"""The warm-up regularizers of Shi et al. 2021 ("Fast Certified Robust Training with Short Warmup", Sec. 3.4).

Both act on the IBP intervals ``[l, u]`` of every ReLU's pre-activation (center ``c = (u + l) / 2``,
radius ``r = (u - l) / 2``), averaged over the ReLU layers, with tolerance ``tau`` (0.5 in the paper):

- tightness: ``relu(tau - r0 / mean(r)) / tau``, where ``r0`` is the mean radius of the (normalized)
  input box: penalizes layers whose bounds grew more than ``1 / tau`` times the input's;
- ReLU balance: with the active (``l > 0``) and inactive (``u < 0``) neurons,
  ``rho_mean = mean(c * active) / -mean(c * inactive)`` and ``rho_var = sum((c - mean c)^2 * active) /
  sum((c - mean c)^2 * inactive)``, each folded to ``min(rho, 1 / rho)``; the term is
  ``(relu(tau - rho_mean) + relu(tau - rho_var)) / tau`` (skipped for a layer where it is not finite).

During the eps warm-up the training loss adds ``lambda * (1 - eps_t / eps_max) * (tightness + balance)``.
Statistics are over the batch each worker holds (as the paper computes them over its one-GPU batch).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .bounds.core import Interval

TERMS = ("tightness", "relu")


def tightness_loss(pre_activations: Sequence[Interval], network_input: Interval, tol: float) -> torch.Tensor:
    """Mean over ReLU layers of ``relu(tol - r0 / mean radius) / tol``."""
    r0 = network_input.radius.mean()
    losses = [F.relu(tol - r0 / iv.radius.mean().clamp(min=1e-12)) / tol for iv in pre_activations]
    return torch.stack(losses).mean()


def relu_balance_loss(pre_activations: Sequence[Interval], tol: float) -> torch.Tensor:
    """Mean over ReLU layers of the active / inactive balance penalty (see the module docstring)."""
    total = torch.zeros((), device=pre_activations[0].lower.device)
    for iv in pre_activations:
        center = iv.center
        active, inactive = (iv.lower > 0).to(center.dtype), (iv.upper < 0).to(center.dtype)
        mean_ratio = (center * active).mean() / -(center * inactive).mean()
        delta = (center - center.mean()).square()
        var_ratio = (delta * active).sum() / (delta * inactive).sum()
        mean_ratio = torch.minimum(mean_ratio, 1.0 / mean_ratio.clamp(min=1e-12))
        var_ratio = torch.minimum(var_ratio, 1.0 / var_ratio.clamp(min=1e-12))
        term = (F.relu(tol - mean_ratio) + F.relu(tol - var_ratio)) / tol
        if bool(torch.isfinite(term)):
            total = total + term
    return total / len(pre_activations)


def warmup_regularizer(pre_activations: Sequence[Interval], network_input: Interval, tol: float,
                       terms: Sequence[str] = TERMS) -> torch.Tensor:
    """Sum of the chosen ``terms`` (``tightness``, ``relu``); zero for a network without ReLUs."""
    if not pre_activations:
        return torch.zeros((), device=network_input.lower.device)
    loss = torch.zeros((), device=network_input.lower.device)
    if "tightness" in terms:
        loss = loss + tightness_loss(pre_activations, network_input, tol)
    if "relu" in terms:
        loss = loss + relu_balance_loss(pre_activations, tol)
    return loss

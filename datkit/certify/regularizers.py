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

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .bounds.core import Interval

TERMS = ("tightness", "relu")


def tightness_loss(pre_activations: Sequence[Interval], network_input: Interval, tol: float) -> torch.Tensor:
    """Mean over ReLU layers of ``relu(tol - r0 / mean radius) / tol``."""
    r0 = network_input.radius.mean()
    losses = [F.relu(tol - r0 / iv.radius.mean().clamp(min=1e-12)) / tol for iv in pre_activations]
    return torch.stack(losses).mean()


class BalanceSums(torch.autograd.Function):
    """``S = [[sum c a, sum c i], [sum d^2 a, sum d^2 i]]`` with ``d = c - mean(c)``, for pre-activation centers ``c``
    and the 0/1 masks ``M = [a; i]`` (active, inactive; shape (2, N), no gradient), as ONE autograd node: two passes
    and one (2, N) x (N, 2) product forward, one product and three passes backward (autograd over the composed ops
    saved and revisited a dozen activation-sized intermediates per layer). Gradient, with ``W = dL/dS @ M``:
    ``dL/dc = W_0 + 2 d W_1 - mean(2 d W_1)`` (the last term: ``mean(c)``'s own dependence on ``c``)."""

    @staticmethod
    def forward(ctx, c: torch.Tensor, M: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        flat = c.reshape(-1)
        X = torch.empty((2, flat.numel()), dtype=c.dtype, device=c.device)
        d = torch.sub(flat, flat.mean(), out=X[0])
        ctx.save_for_backward(d.clone(), M)
        torch.mul(d, d, out=X[1])
        X[0].copy_(flat)
        ctx.shape = c.shape
        return X @ M.T

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        d, M = ctx.saved_tensors
        W = g @ M
        t = W[1].mul_(d).mul_(2.0)
        return W[0].add_(t).sub_(t.mean()).view(ctx.shape), None


def balance_sums(iv: Interval) -> tuple[torch.Tensor, int]:
    """:class:`BalanceSums` of one layer's interval and the number of its neurons ``N``."""
    M = torch.empty((2,) + tuple(iv.lower.shape), dtype=iv.lower.dtype, device=iv.lower.device)
    torch.gt(iv.lower.detach(), 0, out=M[0])
    torch.lt(iv.upper.detach(), 0, out=M[1])
    return BalanceSums.apply(iv.center, M.view(2, -1)), M[0].numel()


def relu_balance_loss(pre_activations: Sequence[Interval], tol: float) -> torch.Tensor:
    """Mean over ReLU layers of the active / inactive balance penalty (see the module docstring)."""
    total = torch.zeros((), device=pre_activations[0].lower.device)
    for iv in pre_activations:
        S, _ = balance_sums(iv)
        mean_ratio = S[0, 0] / -S[0, 1]  # mean(c * active) / -mean(c * inactive): the same N cancels
        var_ratio = S[1, 0] / S[1, 1]
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

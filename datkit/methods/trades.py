"""TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019):

    loss = CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x_adv))

with ``x_adv`` maximizing the KL term by ``attack.steps`` linf PGD steps from ``x + 0.001*N(0, I)``,
generated in eval mode on the unwrapped model, gradients w.r.t. the input only. Inputs in [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import randomness
from .base import METHODS, Method, StepInfo


def trades_attack(raw: nn.Module, x: torch.Tensor, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """linf PGD on ``KL(f(x) || f(x'))``; returns detached ``x'`` in the eps-ball and [0,1]."""
    was_training = raw.training
    raw.eval()
    try:
        with torch.no_grad():
            p_clean = F.softmax(raw(x), dim=1)
        x_adv = (x + 0.001 * randomness.randn(x.shape, x)).clamp(0.0, 1.0).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                kl = F.kl_div(F.log_softmax(raw(x_adv), dim=1), p_clean, reduction="sum")
                (grad,) = torch.autograd.grad(kl, x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0.0, 1.0)
        return x_adv.detach()
    finally:
        raw.train(was_training)


@METHODS.register("trades")
class TRADESTraining(Method):
    """TRADES with ``method.beta`` (default 6.0)."""

    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        return [] if cfg.attack.norm == "linf" else [f"attack.norm={cfg.attack.norm!r}: method {cfg.method.name} "
                                                     "supports only linf"]

    def loss(self, model: nn.Module, raw: nn.Module, x: torch.Tensor, y: torch.Tensor, info: StepInfo) -> torch.Tensor:
        a = self.cfg.attack
        alpha = a.alpha if a.alpha is not None else 2.5 * info.eps / a.steps
        x_adv = trades_attack(raw, x, info.eps, max(alpha, 1e-12), a.steps) if info.eps > 0 else x
        clean, adv = model(x), model(x_adv)
        kl = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
        return F.cross_entropy(clean, y) + self.cfg.method.beta * kl

"""Adversarial training with the DAT objective (Zhang et al., "Distributed Adversarial Training to
Robustify Deep Neural Networks at Scale", UAI 2022):

    loss = lam * CE(f(x), y) + CE(f(x_adv), y)

``lam = 0`` is Madry et al.'s PGD-AT (ICLR 2018). ``x_adv`` comes from PGD (method ``pgd``) or from
FGSM with random start (method ``fgsm``, Wong et al., "Fast is better than free", ICLR 2020),
generated on each worker from its own shard, on the unwrapped model, w.r.t. the input only.
Inputs in [0, 1]; eps in pixel units.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import FGSM, PGD, Attack, NoisyFGSM
from .base import METHODS, Method, StepInfo


class _DATObjective(Method):
    def training_attack(self, eps: float) -> Attack:
        raise NotImplementedError

    def loss(self, model: nn.Module, raw: nn.Module, x: torch.Tensor, y: torch.Tensor, info: StepInfo) -> torch.Tensor:
        x_adv = self.training_attack(info.eps)(raw, x, y)
        loss = F.cross_entropy(model(x_adv), y)
        lam = self.cfg.method.lam
        if lam > 0:
            loss = loss + lam * F.cross_entropy(model(x), y)
        return loss


@METHODS.register("pgd")
class PGDTraining(_DATObjective):
    """DAT / Madry PGD-AT; step size ``attack.alpha`` or ``2.5*eps/steps``."""

    def training_attack(self, eps: float) -> Attack:
        a = self.cfg.attack
        alpha = a.alpha if a.alpha is not None else 2.5 * eps / a.steps
        return PGD(eps=eps, alpha=max(alpha, 1e-12), steps=a.steps, random_start=a.random_start, norm=a.norm,
                   eval_mode=a.eval_mode)


@METHODS.register("fgsm")
class FGSMTraining(_DATObjective):
    """DAT with FGSM + random start ("fast AT"); step size ``attack.alpha`` or ``1.25*eps``."""

    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        return [] if cfg.attack.norm == "linf" else [f"attack.norm={cfg.attack.norm!r}: method {cfg.method.name} "
                                                     "supports only linf"]

    def training_attack(self, eps: float) -> Attack:
        a = self.cfg.attack
        alpha = a.alpha if a.alpha is not None else 1.25 * eps
        return FGSM(eps=eps, alpha=max(alpha, 1e-12), random_start=a.random_start, eval_mode=a.eval_mode)


@METHODS.register("nfgsm")
class NoisyFGSMTraining(_DATObjective):
    """DAT with N-FGSM (de Jorge et al., NeurIPS 2022): noise ``U(-k*eps, k*eps)`` with ``k = attack.noise_mult``,
    one signed step of ``attack.alpha`` (null: eps), no projection to the eps-ball (``datkit.attacks.NoisyFGSM``)."""

    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        e = [] if cfg.attack.norm == "linf" else [f"attack.norm={cfg.attack.norm!r}: method {cfg.method.name} "
                                                  "supports only linf"]
        if cfg.attack.noise_mult < 0:
            e.append(f"attack.noise_mult={cfg.attack.noise_mult!r} must be >= 0")
        return e

    def training_attack(self, eps: float) -> Attack:
        a = self.cfg.attack
        alpha = a.alpha if a.alpha is not None else eps
        return NoisyFGSM(eps=eps, alpha=max(alpha, 1e-12), noise_mult=a.noise_mult, eval_mode=a.eval_mode)

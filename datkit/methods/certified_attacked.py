"""Certified training that also attacks: MTL-IBP, CC-IBP and SABR, on the fast recipe of Shi et al. 2021.

All three are IBP training (``datkit.methods.certified``: IBP initialization, warm-up regularizers, eps schedule
``bounds.eps_schedule`` up to ``eps_max = attack.eps``, gradient clipping) with a PGD point in the loss, so that
the network is trained on a bound less loose than IBP's (inputs in [0, 1], eps in pixel units, l_inf). With
``m_IBP`` the IBP lower bounds of the margins ``f_y - f_j`` over the eps_t-box, ``x_adv`` a PGD point of the
eps_t-ball, ``m_adv`` the margins at ``x_adv`` and ``alpha = bounds.alpha`` in [0, 1]:

- ``mtl-ibp`` (De Palma et al., "Expressive Losses for Verified Robustness via Convex Combinations", ICLR 2024,
  their best-performing loss): ``alpha * CE([0, -m_IBP], 0) + (1 - alpha) * CE(f(x_adv), y)``;
- ``cc-ibp`` (the same paper): ``CE([0, -m], 0)`` with ``m = alpha * m_IBP + (1 - alpha) * m_adv`` (a convex
  combination of the logit differences);
- for both, ``alpha = 1`` is IBP training and ``alpha = 0`` is PGD training (``method.name=pgd method.lam=0``;
  for CC-IBP up to rounding: the cross-entropy is invariant to the shift by ``f_y``);
- ``sabr`` (Mueller et al., "Certified Training: Small Boxes are All You Need", ICLR 2023): with
  ``tau = lambda * eps_t`` (``lambda = bounds.lambda_box`` in (0, 1]), PGD over the eps_t-ball gives ``x_pgd``,
  the centre ``x' = x + clamp(x_pgd - x, -(eps_t - tau), eps_t - tau)`` (the authors' code), and the loss is
  IBP's robust cross-entropy over the small box ``{|x'' - x'|_inf <= tau} ∩ [0, 1]^d``, which lies inside the
  eps_t-box; ``lambda = 1`` is IBP training.

The PGD point comes from the unwrapped model with ``attack.steps`` steps of size ``attack.alpha`` (null:
``2.5 * eps_t / steps``; an absolute step, where the papers scale it with eps_t), ``attack.random_start`` and
``attack.eval_mode``, as for ``method.name=pgd``. The bounds normalize train-mode BatchNorm layers with the clean
batch's statistics (global ones with ``model.sync_bn``), as IBP training and SABR's code do (MTL-IBP's code uses
the adversarial batch's); the regularizers of the warm-up read the bounds of the box in the loss. Not expressed:
the papers' L1 penalty on the weights and their attacks' step-size decay and best-iterate selection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import PGD
from ..certify.bounds import record_batch_stats, spec_matrix
from ..certify.bounds.engines import Margins, certified_margins
from .base import METHODS, StepInfo
from .certified import MIN_REG_EPS, CertifiedTraining, robust_cross_entropy


def _in_unit_interval(errors: list[str], key: str, value: float, *, open_left: bool) -> None:
    low_ok = value > 0.0 if open_left else value >= 0.0
    if not (low_ok and value <= 1.0):
        errors.append(f"{key}={value!r} must be in {'(0' if open_left else '[0'}, 1]")


class _AttackedCertifiedTraining(CertifiedTraining):
    """IBP training whose loss also reads a PGD point; subclasses say where the bounds are taken."""

    bound = "ibp"
    uses_attack = True
    # training_attack stays None: the catastrophic-overfitting check keeps its collapse test (PGD accuracy falling from
    # its best) but does not compare PGD with the training attack at eval.eps while eps_t ramps (the IBP term, not the
    # attack, is what makes the model robust; MTL-IBP with a one-step attack was stopped mid-ramp by that comparison)

    def pgd(self, radius: float) -> PGD:
        """PGD on the ``radius``-ball with the ``attack.*`` settings (the step rule of ``method.name=pgd``)."""
        a = self.cfg.attack
        alpha = a.alpha if a.alpha is not None else 2.5 * radius / a.steps
        return PGD(eps=radius, alpha=max(alpha, 1e-12), steps=a.steps, random_start=a.random_start,
                   eval_mode=a.eval_mode)

    def margins(self, raw: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, stats: dict) -> Margins:
        """IBP margin bounds over the eps-box around ``x`` (``eps >= MIN_REG_EPS``), clean batch statistics."""
        return certified_margins(self.cfg.bounds.engine, raw, x, y, eps, "ibp", batch_stats=stats,
                                 num_classes=self.num_classes)

    def clean_loss(self, model: nn.Module, raw: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   eps: float) -> torch.Tensor:
        """While ``eps_t = 0``: the clean cross-entropy, plus the regularizers on bounds at ``MIN_REG_EPS``."""
        with record_batch_stats(raw) as stats:
            logits = model(x)
        loss = F.cross_entropy(logits, y)
        if self.reg_weight(eps) == 0:
            return loss
        return self.regularized(loss, self.margins(raw, x, y, MIN_REG_EPS, stats), eps)


class _ExpressiveLoss(_AttackedCertifiedTraining):
    """The expressive losses of De Palma et al. (ICLR 2024): the IBP loss and the PGD loss combined with
    ``alpha = bounds.alpha`` in [0, 1]; subclasses say how (``combine``)."""

    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        errors = super().config_errors(cfg)
        _in_unit_interval(errors, "bounds.alpha", cfg.bounds.alpha, open_left=False)
        return errors

    def combine(self, m_ibp: torch.Tensor | None, logits_adv: torch.Tensor | None, y: torch.Tensor,
                alpha: float) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: nn.Module, raw: nn.Module, x: torch.Tensor, y: torch.Tensor, info: StepInfo) -> torch.Tensor:
        eps, alpha = info.eps, self.cfg.bounds.alpha
        if eps <= 0:
            return self.clean_loss(model, raw, x, y, eps)
        logits_adv = None
        if alpha < 1:  # the attack first, as in PGD training (the same random start at alpha = 0)
            logits_adv = model(self.pgd(eps)(raw, x, y))
            if alpha == 0 and self.reg_weight(eps) == 0:
                return self.combine(None, logits_adv, y, alpha)
        with record_batch_stats(raw) as stats:
            model(x)  # the clean batch statistics for the bounds (train-mode BatchNorm)
        m = self.margins(raw, x, y, eps, stats)
        return self.regularized(self.combine(m.lower, logits_adv, y, alpha), m, eps)


@METHODS.register("mtl-ibp")
class MTLIBPTraining(_ExpressiveLoss):
    """MTL-IBP (De Palma et al., ICLR 2024): ``alpha * CE([0, -m_IBP], 0) + (1 - alpha) * CE(f(x_adv), y)``."""

    def combine(self, m_ibp, logits_adv, y, alpha):
        if logits_adv is None:
            return robust_cross_entropy(m_ibp)
        adv = F.cross_entropy(logits_adv, y)
        return adv if m_ibp is None else alpha * robust_cross_entropy(m_ibp) + (1.0 - alpha) * adv


@METHODS.register("cc-ibp")
class CCIBPTraining(_ExpressiveLoss):
    """CC-IBP (De Palma et al., ICLR 2024): ``CE([0, -m], 0)`` with ``m = alpha * m_IBP + (1 - alpha) * m_adv``."""

    def combine(self, m_ibp, logits_adv, y, alpha):
        if logits_adv is None:
            return robust_cross_entropy(m_ibp)
        C = spec_matrix(y, logits_adv.shape[1]).to(logits_adv.dtype)
        m_adv = (C @ logits_adv.unsqueeze(-1)).squeeze(-1)  # f_y - f_j at x_adv, in the bounds' class order
        return robust_cross_entropy(m_adv if m_ibp is None else alpha * m_ibp + (1.0 - alpha) * m_adv)


@METHODS.register("sabr")
class SABRTraining(_AttackedCertifiedTraining):
    """SABR (Mueller et al., ICLR 2023): IBP over the ``lambda * eps_t``-box around a PGD point (module docstring)."""

    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        errors = super().config_errors(cfg)
        _in_unit_interval(errors, "bounds.lambda_box", cfg.bounds.lambda_box, open_left=True)
        return errors

    def loss(self, model: nn.Module, raw: nn.Module, x: torch.Tensor, y: torch.Tensor, info: StepInfo) -> torch.Tensor:
        eps = info.eps
        if eps <= 0:
            return self.clean_loss(model, raw, x, y, eps)
        tau = self.cfg.bounds.lambda_box * eps
        center = x
        if tau < eps:  # PGD over the eps-box, then the point is pulled into the (eps - tau)-box (the authors' code)
            shift = (self.pgd(eps)(raw, x, y).detach() - x).clamp(-(eps - tau), eps - tau)
            center = x + shift
        with record_batch_stats(raw) as stats:
            model(x)
        m = self.margins(raw, center, y, max(tau, MIN_REG_EPS), stats)
        return self.regularized(robust_cross_entropy(m.lower), m, eps)

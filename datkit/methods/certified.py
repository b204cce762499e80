"""Certified training with bound propagation: methods ``ibp`` and ``crown-ibp``, with the fast recipe of
Shi et al. 2021 ("Fast Certified Robust Training with Short Warmup", NeurIPS 2021).

Per step, with ``eps_t`` from the warm-up schedule (``bounds.eps_schedule`` over ``bounds.eps_start`` /
``bounds.eps_length`` epochs up to ``eps_max = attack.eps``):

1. the clean forward pass goes through the backend's (possibly DDP-wrapped) model, recording every
   train-mode BatchNorm's batch statistics for the bounds (global over workers for SyncBatchNorm);
2. lower bounds ``m`` of the margins ``f_y(x') - f_j(x')`` over ``{|x' - x|_inf <= eps_t} ∩ [0,1]^d``
   come from the unwrapped model: IBP (Gowal et al. 2018) or CROWN-IBP (Zhang et al., ICLR 2020),
   ``beta * CROWN-IBP + (1 - beta) * IBP`` with ``beta = b + (1 - b)(1 - eps_t / eps_max)``, ``b =
   bounds.beta_final`` (CROWN-IBP's decay of beta from 1 to ``b`` over the ramp; with the default ``b = 0`` it is
   IBP after the ramp);
3. ``loss = CE([0, -m], 0)``: cross-entropy of the worst-case logits (Wong & Kolter 2018; the true class
   at 0, class j at ``-m_j``); while ``eps_t = 0`` the loss is the clean ``CE(f(x), y)``. CROWN-IBP with
   ``bounds.loss_fusion=true`` (the default) bounds the cross-entropy itself with one backward row instead
   (Xu et al. 2020's loss fusion, ``datkit/certify/bounds/loss_fusion.py``) and mixes the two upper bounds of
   ``sum_j exp(f_j - f_y)`` with the same beta;
4. during the warm-up (``eps_t < eps_max``) the regularizers of Shi et al. are added with weight
   ``bounds.reg_lambda * (1 - eps_t / eps_max)``, on bounds at ``max(eps_t, 1e-6)`` (as the authors' code).

The model is initialized with the IBP initialization (``bounds.init=ibp``) before training; gradient
clipping is ``train.grad_clip`` (10 in the paper configs). ``reg_lambda=0`` and ``init=default`` give
vanilla IBP / CROWN-IBP. Evaluation adds the verified accuracy VA (and verified error VE) at ``eval.eps``.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..certify.bounds import record_batch_stats
from ..certify.bounds.engines import certified_fused_loss, certified_margins, require_engine
from ..certify.cascade import VerifiedAccuracy, pgd_falsifier  # VerifiedAccuracy: kept importable from here
from ..certify.config_checks import certified_method_errors
from ..certify.ibp_init import ibp_init
from ..certify.regularizers import warmup_regularizer
from ..certify.schedules import eps_schedule
from .base import METHODS, Method, StepInfo

MIN_REG_EPS = 1e-6  # bounds for the regularizers while eps_t = 0 (the authors' --min-eps-reg)


def robust_cross_entropy(margin_lower: torch.Tensor) -> torch.Tensor:
    """``CE([0, -m_1, ..., -m_{K-1}], 0)`` averaged over the batch, for margin lower bounds ``m`` (B, K-1)."""
    logits = torch.cat([torch.zeros_like(margin_lower[:, :1]), -margin_lower], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


class CertifiedTraining(Method):
    """IBP-family certified training (see the module docstring); subclasses fix the bound."""

    bound = "ibp"
    uses_attack = False
    reads_parameters = True  # the bound rules read module.weight / running statistics directly

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        from ..data import DATASETS

        require_engine(cfg.bounds.engine)
        self.num_classes = DATASETS.get(cfg.data.name).num_classes if cfg.data.name in DATASETS else None

    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        """l_inf balls only, and the bound engine must be importable (``bounds.*`` values: ``bounds_config_errors``)."""
        return certified_method_errors(cfg)

    def train_eps(self, progress: float) -> float:
        b = self.cfg.bounds
        return eps_schedule(b.eps_schedule, self.cfg.attack.eps, b.eps_start, b.eps_length, progress)

    def prepare_model(self, model: nn.Module) -> None:
        if self.cfg.bounds.init == "ibp":
            ibp_init(model)

    def reg_weight(self, eps: float) -> float:
        """``lambda * (1 - eps_t / eps_max)`` during the warm-up, 0 after it."""
        b, eps_max = self.cfg.bounds, self.cfg.attack.eps
        if b.reg_lambda <= 0 or eps_max <= 0 or eps >= eps_max:
            return 0.0
        return b.reg_lambda * (1.0 - eps / eps_max)

    def loss(self, model: nn.Module, raw: nn.Module, x: torch.Tensor, y: torch.Tensor, info: StepInfo) -> torch.Tensor:
        eps, eps_max, b = info.eps, self.cfg.attack.eps, self.cfg.bounds
        with record_batch_stats(raw) as stats:
            logits = model(x)
        reg = self.reg_weight(eps)
        if eps <= 0 and reg == 0:
            return F.cross_entropy(logits, y)
        # CROWN-IBP's mixing weight: 1 -> bounds.beta_final over the ramp (Zhang et al. 2020's beta schedule)
        beta = b.beta_final + (1.0 - b.beta_final) * (1.0 - eps / eps_max) if eps_max > 0 else b.beta_final
        method = self.bound if eps > 0 else "ibp"  # at eps_t = 0 only the regularizers' IBP intervals are needed
        fused = method == "crown-ibp" and beta > 0 and b.loss_fusion  # one backward row for the loss (loss_fusion.py)
        bound = certified_fused_loss if fused else partial(certified_margins, method=method)
        m = bound(b.engine, raw, x, y, max(eps, MIN_REG_EPS), beta=beta, batch_stats=stats,
                  num_classes=self.num_classes)
        loss = (m.loss if fused else robust_cross_entropy(m.lower)) if eps > 0 else F.cross_entropy(logits, y)
        return self.regularized(loss, m, eps)

    def regularized(self, loss: torch.Tensor, m, eps: float) -> torch.Tensor:
        """``loss`` plus the warm-up regularizers on the intervals of the bounds ``m`` (weight :meth:`reg_weight`)."""
        reg, b = self.reg_weight(eps), self.cfg.bounds
        if reg > 0:
            loss = loss + reg * warmup_regularizer(m.relu_inputs, m.network_input, b.reg_tol, b.reg_terms)
        return loss

    def eval_metrics(self) -> dict[str, VerifiedAccuracy]:
        eps = self.cfg.eval.eps if self.cfg.eval.eps is not None else self.cfg.attack.eps
        falsifier = pgd_falsifier(self.cfg.eval, eps)  # before full CROWN: drops what PGD breaks
        return {"VA": VerifiedAccuracy(eps, self.cfg.bounds.verify, self.cfg.bounds.engine, self.num_classes,
                                       falsifier)}


@METHODS.register("ibp")
class IBPTraining(CertifiedTraining):
    """Interval bound propagation training (Gowal et al. 2018) with the fast recipe of Shi et al. 2021."""

    bound = "ibp"


@METHODS.register("crown-ibp")
class CROWNIBPTraining(CertifiedTraining):
    """CROWN-IBP training (Zhang et al., ICLR 2020): beta * CROWN-IBP + (1 - beta) * IBP margins."""

    bound = "crown-ibp"

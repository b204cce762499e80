"""Training for randomized smoothing: Gaussian data augmentation, optionally SmoothAdv.

- Gaussian augmentation (Cohen et al., "Certified Adversarial Robustness via Randomized Smoothing",
  ICML 2019): ``loss = mean_i CE(f(x + e_i), y)``, ``e_i ~ N(0, sigma^2 I)``, ``i = 1..m``
  (``smoothing.sigma``, ``m = smoothing.num_noise``; Cohen et al. use m = 1).
- SmoothAdv (Salman et al., "Provably Robust Deep Learning via Adversarially Trained Smoothed
  Classifiers", NeurIPS 2019), when ``smoothing.adv_steps > 0``: first an l2 PGD attack on the
  *soft* smoothed classifier, with the noise samples ``e_i`` fixed,

      x' = argmax_{||x' - x||_2 <= eps} -log( (1/m) sum_i softmax(f(x' + e_i))_y ),

  (``adv_steps`` steps of size ``2*eps/adv_steps`` from ``x``, on the unwrapped model in eval mode, the
  gradient w.r.t. the input only, ``x'`` clamped to [0, 1]), then the Gaussian loss at ``x'`` with the
  same noise: ``mean_i CE(f(x' + e_i), y)``. ``eps = smoothing.adv_eps``, ramped from 0 over
  ``attack.eps_warmup_epochs`` like ``attack.eps`` (the step's ramp factor is ``info.eps / attack.eps``).

Inputs in [0, 1]; noise in pixel units, added before the model's normalization, not clipped (the
certificate of ``datkit.certify.Smooth`` is for exactly this noise).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import randomness
from ..attacks import PGD
from .base import METHODS, Method, StepInfo


class _SoftSmoothed(nn.Module):
    """``log((1/m) sum_i softmax(f(x + e_i)))`` for fixed noise ``e`` of shape ``(m, B, ...)``.

    Cross-entropy on these log-probabilities is SmoothAdv's objective, so the stock PGD attack applies.
    """

    def __init__(self, model: nn.Module, noise: torch.Tensor) -> None:
        super().__init__()
        self.model, self.noise = model, noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, b = self.noise.shape[:2]
        logits = self.model((x.unsqueeze(0) + self.noise).flatten(0, 1)).view(m, b, -1)
        return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(m)


@METHODS.register("smoothing")
class SmoothingTraining(Method):
    """Gaussian noise augmentation (``smoothing.sigma``, ``num_noise``); SmoothAdv if ``adv_steps > 0``."""

    uses_attack = False

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.uses_attack = cfg.smoothing.adv_steps > 0

    def loss(self, model: nn.Module, raw: nn.Module, x: torch.Tensor, y: torch.Tensor, info: StepInfo) -> torch.Tensor:
        s = self.cfg.smoothing
        # drawn per sample (B, m, ...) then laid out (m, B, ...): keyed noise does not depend on the worker count
        noise = randomness.randn((x.shape[0], s.num_noise, *x.shape[1:]), x).transpose(0, 1) * s.sigma
        if s.adv_steps > 0:
            x = self.smoothadv(raw, x, y, noise, self.adv_eps(info))
        noisy = (x.unsqueeze(0) + noise).flatten(0, 1)
        return F.cross_entropy(model(noisy), y.repeat(s.num_noise))

    def adv_eps(self, info: StepInfo) -> float:
        """``smoothing.adv_eps`` times the eps ramp's progress ``info.eps / attack.eps`` (1 when attack.eps = 0)."""
        ramp = info.eps / self.cfg.attack.eps if self.cfg.attack.eps > 0 else 1.0
        return self.cfg.smoothing.adv_eps * min(1.0, max(0.0, ramp))

    def smoothadv(self, raw: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor,
                  eps: float) -> torch.Tensor:
        """SmoothAdv's l2 PGD on the soft smoothed classifier with fixed ``noise`` (see the module docstring)."""
        steps = self.cfg.smoothing.adv_steps
        if eps <= 0:
            return x
        attack = PGD(eps=eps, alpha=2 * eps / steps, steps=steps, random_start=False, norm="l2", eval_mode=True)
        return attack(_SoftSmoothed(raw, noise), x, y)

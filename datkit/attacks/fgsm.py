"""FGSM with a random start (Wong et al., ICLR 2020), the attack of "fast" adversarial training."""
from __future__ import annotations

import torch
from torch import nn

from datkit.attacks.base import ATTACKS, Attack, _check_number


@ATTACKS.register("fgsm")
class FGSM(Attack):
    """FGSM with random start, from "Fast is better than free: Revisiting adversarial training"
    (Wong, Rice & Kolter, ICLR 2020).

    Norm: ``"linf"`` only. ``delta ~ U(-eps, eps)`` (if ``random_start``), one step
    ``delta += alpha * sign(grad)`` of the summed cross-entropy, ``delta`` clipped to
    ``[-eps, eps]`` and ``x + delta`` clamped to [0, 1]. Inputs must lie in [0, 1].
    With ``random_start=False`` and ``alpha >= eps`` it is the classic FGSM of Goodfellow et al.

    Args:
        eps: radius of the l_inf ball (default 0.3).
        alpha: step size (default None: ``1.25 * eps``, Wong et al.'s choice).
        random_start: start from ``U(-eps, eps)`` noise (default True).
        norm: must be ``"linf"`` (the default); accepted so configs can name it.
        eval_mode: switch the model to eval mode during the attack (default False: keep its mode).
        generator: ``torch.Generator`` for the random start (default None: the global RNG).
    """

    supported_norms = ("linf",)

    def __init__(
        self,
        eps: float = 0.3,
        alpha: float | None = None,
        random_start: bool = True,
        norm: str = "linf",
        *,
        eval_mode: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(eps, norm=norm, eval_mode=eval_mode, generator=generator)
        if alpha is None:
            self.alpha = 1.25 * self.eps
        else:
            self.alpha = _check_number("alpha", alpha, minimum=0.0, strict=True)
        self.random_start = bool(random_start)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = self._random_start(x) if self.random_start else x.clone()
        grad = self._input_grad(model, x_adv, y)
        return self._project(x_adv + self.alpha * grad.sign(), x)

    def _repr_args(self) -> dict[str, object]:
        return {**super()._repr_args(), "alpha": self.alpha, "random_start": self.random_start}


class NoisyFGSM(Attack):
    """N-FGSM, from "Make Some Noise: Reliable and Efficient Single-Step Adversarial Training" (de Jorge, Bibi,
    Volpi, Sanyal, Torr, Rogez & Dokania, NeurIPS 2022): the training perturbation of single-step AT without
    catastrophic overfitting.

    ``x_n = clamp(x + U(-k*eps, k*eps), 0, 1)``, ``x_adv = clamp(x_n + alpha * sign(grad_x CE(f(x_n), y)), 0, 1)``,
    with no projection back to the eps-ball: the perturbation reaches ``(k + alpha/eps) * eps`` (3 eps with the
    paper's ``k = 2, alpha = eps``). Larger noise and no clipping are what keep it from overfitting
    catastrophically. Not a threat-model attack (it leaves the ball), so it is not in ``ATTACKS``: the ``nfgsm``
    training method uses it. Inputs in [0, 1], ``linf`` only.

    Args:
        eps: the training budget (the ball the model is meant to be robust in).
        alpha: step size (default None: ``eps``).
        noise_mult: ``k``, the noise's half-width in units of eps (default 2.0).
        eval_mode: switch the model to eval mode during the attack (default False).
    """

    supported_norms = ("linf",)

    def __init__(self, eps: float = 0.3, alpha: float | None = None, noise_mult: float = 2.0, *,
                 eval_mode: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__(eps, norm="linf", eval_mode=eval_mode, generator=generator)
        self.alpha = self.eps if alpha is None else _check_number("alpha", alpha, minimum=0.0, strict=True)
        self.noise_mult = _check_number("noise_mult", noise_mult, minimum=0.0, strict=False)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_n = (x + (2 * self._rand(x.shape, x) - 1) * (self.noise_mult * self.eps)).clamp(0.0, 1.0)
        grad = self._input_grad(model, x_n, y)
        return (x_n + self.alpha * grad.sign()).clamp(0.0, 1.0)

    def _repr_args(self) -> dict[str, object]:
        return {**super()._repr_args(), "alpha": self.alpha, "noise_mult": self.noise_mult}

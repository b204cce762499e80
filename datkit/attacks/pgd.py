"""Projected gradient descent (Madry et al., ICLR 2018), l_inf and l_2, with random restarts."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datkit.attacks.base import ATTACKS, Attack, _check_int, _check_number, _per_sample_l2


@ATTACKS.register("pgd")
class PGD(Attack):
    """PGD from "Towards Deep Learning Models Resistant to Adversarial Attacks" (Madry et al., ICLR 2018).

    Norm: ``"linf"`` (step ``alpha * sign(grad)``) or ``"l2"`` (step ``alpha * grad / ||grad||_2``
    per sample); after every step the point is projected onto the eps-ball and clamped to [0, 1].
    The loss is the cross-entropy summed over the batch. Inputs must lie in [0, 1].

    Args:
        eps: radius of the ball (default 0.3, Madry's MNIST setting).
        alpha: step size (default 0.01).
        steps: number of gradient steps (default 40).
        random_start: start from a random point of the ball (default True): uniform in
            ``[-eps, eps]`` per coordinate for l_inf; a random direction times ``u * eps``,
            ``u ~ U[0, 1)``, for l2.
        norm: ``"linf"`` (default) or ``"l2"``.
        restarts: number of runs (default 1); per sample, the first run that misclassifies it is
            kept, else the run with the largest loss.
        eval_mode: switch the model to eval mode during the attack (default False: keep its mode).
        generator: ``torch.Generator`` for the random start (default None: the global RNG).
    """

    def __init__(
        self,
        eps: float = 0.3,
        alpha: float = 0.01,
        steps: int = 40,
        random_start: bool = True,
        norm: str = "linf",
        restarts: int = 1,
        *,
        eval_mode: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(eps, norm=norm, eval_mode=eval_mode, generator=generator)
        self.alpha = _check_number("alpha", alpha, minimum=0.0, strict=True)
        self.steps = _check_int("steps", steps, minimum=1)
        self.random_start = bool(random_start)
        self.restarts = _check_int("restarts", restarts, minimum=1)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.restarts == 1:
            return self._run(model, x, y)
        best = x.clone()
        best_loss = torch.full((x.shape[0],), -float("inf"), device=x.device)
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            x_adv = self._run(model, x, y)
            with torch.no_grad():
                logits = model(x_adv)
                loss = F.cross_entropy(logits, y, reduction="none").float()
                wrong = logits.argmax(dim=1) != y
            update = ~fooled & (wrong | (loss > best_loss))
            best[update] = x_adv[update]
            best_loss = torch.where(update, loss, best_loss)
            fooled |= wrong
            if bool(fooled.all()):
                break
        return best

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One PGD run from a (random) start."""
        x_adv = self._random_start(x) if self.random_start else x.clone()
        for _ in range(self.steps):
            grad = self._input_grad(model, x_adv, y)
            if self.norm == "linf":
                step = grad.sign()
            else:
                step = grad / _per_sample_l2(grad).clamp_min(1e-12)
            x_adv = self._project(x_adv.detach() + self.alpha * step, x)
        return x_adv

    def _repr_args(self) -> dict[str, object]:
        return {**super()._repr_args(), "alpha": self.alpha, "steps": self.steps,
                "random_start": self.random_start, "restarts": self.restarts}

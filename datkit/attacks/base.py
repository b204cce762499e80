"""Base class of the adversarial attacks, the ``ATTACKS`` registry and the shared l_p helpers.

The design follows torchattacks' template method: :meth:`Attack.__call__` validates the inputs,
handles the model's train/eval mode and the autograd context, and delegates the actual search to
:meth:`Attack.perturb`, which subclasses implement. Unlike torchattacks, the model is passed at call
time and never stored, so one attack object serves any model; callers pass the *unwrapped* model
(``ddp_model.module``), which keeps DDP's gradient hooks and buffer broadcasts out of the attack.

Gradients are taken with respect to the input only (``torch.autograd.grad(loss, x_adv)``), so an
attack never creates or changes the parameters' ``.grad``.
"""
from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from datkit import randomness
from datkit.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack")

NORMS: tuple[str, ...] = ("linf", "l2")


def _check_number(name: str, value: object, *, minimum: float, strict: bool) -> float:
    """``value`` as a float; a ValueError naming ``name`` unless it is a finite number >= (>) minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def _check_int(name: str, value: object, *, minimum: int) -> int:
    """``value`` as an int; a ValueError naming ``name`` unless it is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value  # type: ignore[return-value]


def _per_sample_l2(t: torch.Tensor) -> torch.Tensor:
    """l2 norm of every sample, shaped ``(N, 1, 1, ...)`` to broadcast against ``t``."""
    norms = t.flatten(1).norm(p=2, dim=1)
    return norms.view(-1, *([1] * (t.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project ``x_adv`` onto the ``norm``-ball of radius ``eps`` around ``x``, then clamp to [0, 1].

    Clamping after projecting keeps the point in the ball: each coordinate moves towards ``x``.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        factor = (eps / _per_sample_l2(delta).clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * factor
    return (x + delta).clamp(0.0, 1.0)


class Attack(ABC):
    """Template of an untargeted evasion attack on a classifier whose inputs lie in [0, 1].

    Args:
        eps: radius of the threat model's ball (>= 0; 0 returns the input unchanged).
        norm: ``"linf"`` or ``"l2"``; subclasses may support fewer (``supported_norms``).
        eval_mode: if True, the model is switched to eval mode during the attack; if False
            (default), the attack runs in whatever mode the model is in. Either way every module's
            mode is restored afterwards.
        generator: ``torch.Generator`` for the random start (None: per-sample keyed noise inside
            ``datkit.randomness.keyed``, else the global RNG).

    Calling ``attack(model, x, y)`` returns a detached tensor of the same shape and dtype as ``x``,
    inside the eps-ball around ``x`` and inside [0, 1].
    """

    supported_norms: ClassVar[tuple[str, ...]] = NORMS

    def __init__(
        self,
        eps: float,
        *,
        norm: str = "linf",
        eval_mode: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.eps = _check_number("eps", eps, minimum=0.0, strict=False)
        self.norm = _check_choice("norm", norm, self.supported_norms)
        self.eval_mode = bool(eval_mode)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator

    # ----------------------------------------------------------------------------------------
    # template
    # ----------------------------------------------------------------------------------------
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Validate, set the model's mode, run :meth:`perturb` with grad enabled, restore the mode."""
        x, y = self._validate_inputs(x, y)
        if self.eps == 0:
            return x.clone()
        modes = [(m, m.training) for m in model.modules()]
        try:
            if self.eval_mode:
                model.eval()
            with torch.enable_grad():
                x_adv = self.perturb(model, x, y)
        finally:
            for module, training in modes:
                module.training = training
        return x_adv.detach().to(dtype=x.dtype)

    @abstractmethod
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return adversarial examples for the (validated, detached) batch ``x`` with labels ``y``."""

    # ----------------------------------------------------------------------------------------
    # helpers for subclasses
    # ----------------------------------------------------------------------------------------
    @staticmethod
    def _validate_inputs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError("x must be a floating-point tensor with values in [0, 1], "
                             f"got {getattr(x, 'dtype', type(x))}")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch of shape (N, ...), got shape {tuple(x.shape)}")
        lo, hi = torch.aminmax(x.detach())
        if not (lo >= 0 and hi <= 1):  # also rejects NaN
            raise ValueError(f"x must lie in [0, 1], got values in [{lo.item():.4g}, {hi.item():.4g}]")
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"y must be an integer tensor of class indices, got {getattr(y, 'dtype', type(y))}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
        return x.detach(), y.detach().long()

    @staticmethod
    def _loss(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy summed over the batch, so per-sample steps do not depend on the batch size."""
        return F.cross_entropy(model(x_adv), y, reduction="sum")

    def _input_grad(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient of the loss w.r.t. the input only; parameters' ``.grad`` is never touched."""
        x_adv = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self._loss(model, x_adv, y), x_adv)
        return grad

    def _rand(self, shape: tuple[int, ...], like: torch.Tensor, *, normal: bool = False) -> torch.Tensor:
        """U[0, 1) (or N(0, 1)) noise of ``shape`` with ``like``'s dtype and device.

        Drawn from ``self.generator`` if one is set (on the generator's device, then moved, so a CPU
        generator also serves CUDA inputs); else per sample inside ``datkit.randomness.keyed`` (what the
        trainer and the evaluation use: the noise of a sample does not depend on the worker count), else
        from the global RNG.
        """
        if self.generator is None:
            return randomness.randn(shape, like) if normal else randomness.rand(shape, like)
        draw = torch.randn if normal else torch.rand
        noise = draw(shape, dtype=like.dtype, device=self.generator.device, generator=self.generator)
        return noise.to(like.device)

    def _random_start(self, x: torch.Tensor) -> torch.Tensor:
        """A random point of the eps-ball around ``x`` (l2: random direction, radius u * eps), in [0, 1]."""
        if self.norm == "linf":
            delta = (2 * self._rand(x.shape, x) - 1) * self.eps
        else:
            direction = self._rand(x.shape, x, normal=True)
            direction = direction / _per_sample_l2(direction).clamp_min(1e-12)
            radius = self._rand((x.shape[0],) + (1,) * (x.dim() - 1), x)
            delta = direction * radius * self.eps
        return (x + delta).clamp(0.0, 1.0)

    def _project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return project(x_adv, x, self.eps, self.norm)

    def _repr_args(self) -> dict[str, object]:
        return {"eps": self.eps, "norm": self.norm, "eval_mode": self.eval_mode}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{type(self).__name__}({args})"

"""LALR: the layer-wise adaptive learning rate of DAT (Zhang et al., "Distributed Adversarial Training to
Robustify Deep Neural Networks at Scale", UAI 2022, Algorithm 1), LAMB-like (You et al., ICLR 2020).

Per parameter tensor ("layer") ``theta`` with base-optimizer direction ``u``::

    theta <- theta - tau(||theta||) * lr * u / ||u||,      tau(z) = min(max(z, c_l), c_u)

so every adapted tensor moves by exactly ``tau * lr`` in l2 norm per step, whatever the gradient scale:
large batches (and the linear scaling rule's large lr) cannot blow up a layer whose gradient happens to be
large relative to its weights. ``u`` is

- ``base="adam"``: ``m_hat / (sqrt(v_hat) + eps) + weight_decay * theta`` (bias-corrected Adam moments, the
  weight decay folded in after the normalization, as in LAMB);
- ``base="sgd"``: the heavy-ball buffer ``b <- momentum * b + (g + weight_decay * theta)`` (weight decay folded
  into the gradient, as ``torch.optim.SGD`` does; ``nesterov=True`` uses ``g' + momentum * b``).

``||u|| = 0`` (no gradient signal) leaves ``theta`` unchanged. With ``c_l = 0`` a tensor of norm 0 stays
at 0 (tau = 0): exclude it or set ``c_l > 0``. Tensors chosen by ``exclude`` get the plain base update
without the trust ratio, ``theta <- theta - lr * u`` (Adam: AdamW with the same ``u``; SGD: exactly
``torch.optim.SGD``): ``"bias_and_norm"`` (default) excludes every tensor with ``ndim <= 1`` -- biases and
the weights of BatchNorm / LayerNorm / GroupNorm --, ``"none"`` adapts every tensor, and a callable
``exclude(param) -> bool`` decides per tensor. A param group may set its own ``exclude``.

The defaults ``c_l = 0``, ``c_u = 10`` are those of the DAT authors' code (the weight norm clamped to
[0, 10]). State per tensor: ``step`` and ``exp_avg``/``exp_avg_sq`` (adam) or ``momentum_buffer`` (sgd);
``state_dict``/``load_state_dict`` resume exactly. Gradients must already be averaged over workers (any
backend's step does that first); the optimizer itself communicates nothing, so it also serves as a
DeepSpeed client optimizer.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

ExcludeSpec = str | Callable[[torch.Tensor], bool]
EXCLUDE_CHOICES = ("bias_and_norm", "none")
BASES = ("adam", "sgd")


def _exclude_fn(spec: ExcludeSpec) -> Callable[[torch.Tensor], bool]:
    if callable(spec):
        return spec
    if spec == "bias_and_norm":
        return lambda p: p.ndim <= 1
    if spec == "none":
        return lambda p: False
    raise ValueError(f"LALR: exclude={spec!r} is not one of {', '.join(EXCLUDE_CHOICES)} or a callable")


def trust_coefficient(weight_norm: torch.Tensor, c_l: float, c_u: float) -> torch.Tensor:
    """``tau(||theta||) = min(max(||theta||, c_l), c_u)``."""
    return weight_norm.clamp(min=c_l, max=c_u)


def trust_ratio_step(p: torch.Tensor, u: torch.Tensor, lr: float, c_l: float, c_u: float, excluded: bool) -> None:
    """LALR's per-tensor step on ``p`` along ``u`` (overwritten): ``theta -= tau(||theta||) * lr * u / ||u||``, nothing
    when ``||u|| = 0``; an ``excluded`` tensor takes the plain ``theta -= lr * u``."""
    if excluded:
        p.add_(u, alpha=-lr)
        return
    u_norm = torch.linalg.vector_norm(u)
    tau = trust_coefficient(torch.linalg.vector_norm(p), c_l, c_u)
    scale = torch.where(u_norm > 0, tau * lr / u_norm.clamp(min=torch.finfo(u.dtype).tiny), torch.zeros_like(u_norm))
    p.sub_(u.mul_(scale))


class LALR(torch.optim.Optimizer):
    """Layer-wise adaptive learning rate over an Adam or SGD-momentum direction (see the module docstring).

    Args:
        params: parameters or param groups.
        lr: learning rate (the l2 distance an adapted tensor moves per step is ``tau * lr``).
        base: ``"adam"`` or ``"sgd"``: which direction ``u`` is normalized.
        betas, eps: Adam moment coefficients and denominator epsilon (``base="adam"``).
        momentum, nesterov: heavy-ball coefficient and Nesterov variant (``base="sgd"``).
        weight_decay: L2 coefficient folded into ``u``.
        c_l, c_u: clip range of the trust coefficient ``tau`` (``0 <= c_l <= c_u``).
        exclude: which tensors skip the trust ratio: ``"bias_and_norm"``, ``"none"`` or a callable.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, base: str = "adam",
                 betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0,
                 c_l: float = 0.0, c_u: float = 10.0, exclude: ExcludeSpec = "bias_and_norm") -> None:
        if base not in BASES:
            raise ValueError(f"LALR: base={base!r} is not one of {', '.join(BASES)}")
        if lr <= 0:
            raise ValueError(f"LALR: lr={lr} must be > 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LALR: betas={tuple(betas)} must be in [0, 1)")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LALR: momentum={momentum} must be in [0, 1)")
        if weight_decay < 0 or eps < 0:
            raise ValueError(f"LALR: weight_decay={weight_decay} and eps={eps} must be >= 0")
        if not 0.0 <= c_l <= c_u:
            raise ValueError(f"LALR: need 0 <= c_l <= c_u, got c_l={c_l}, c_u={c_u}")
        _exclude_fn(exclude)  # fail now on a bad spec
        defaults = dict(lr=lr, base=base, betas=tuple(betas), eps=eps, momentum=momentum, nesterov=nesterov,
                        weight_decay=weight_decay, c_l=c_l, c_u=c_u, exclude=exclude)
        super().__init__(params, defaults)

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict``, with a callable ``exclude`` recorded as ``"callable"``
        (checkpoints load with ``weights_only=True``); ``load_state_dict`` keeps the current groups' callables."""
        sd = super().state_dict()
        for g in sd["param_groups"]:
            if callable(g.get("exclude")):
                g["exclude"] = "callable"
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the per-tensor state; a saved ``exclude="callable"`` keeps this optimizer's callable."""
        current = [g["exclude"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, ex in zip(self.param_groups, current):
            if g.get("exclude") == "callable":
                g["exclude"] = ex

    def _direction(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """The base optimizer's update direction ``u`` (state updated in place)."""
        g = p.grad
        if g.is_sparse:
            raise RuntimeError("LALR does not support sparse gradients")
        state = self.state[p]
        wd = group["weight_decay"]
        state["step"] = int(state.get("step", 0)) + 1
        if group["base"] == "adam":
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            b1, b2 = group["betas"]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            t = state["step"]
            u = (m / (1 - b1 ** t)).div_((v / (1 - b2 ** t)).sqrt_().add_(group["eps"]))
            if wd:
                u.add_(p, alpha=wd)
            return u
        d = g.add(p, alpha=wd) if wd else g
        mu = group["momentum"]
        if mu == 0:
            return d.clone()
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = d.detach().clone()
        else:
            state["momentum_buffer"].mul_(mu).add_(d)
        buf = state["momentum_buffer"]
        return d.add(buf, alpha=mu) if group["nesterov"] else buf.clone()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One LALR step over every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            excluded = _exclude_fn(group["exclude"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                trust_ratio_step(p, self._direction(p, group), group["lr"], group["c_l"], group["c_u"], excluded(p))
        return loss

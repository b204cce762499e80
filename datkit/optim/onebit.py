"""1-bit Adam (Tang et al., ICML 2021) and 1-bit LAMB (Li et al., 2021, on DAT's LALR trust ratio), on every backend.

Why: compressing Adam's *gradients* to one bit (EF-SignSGD, ``compression.name=onebit``) breaks Adam -- the
variance ``v`` then tracks the compression noise. 1-bit Adam's observation is that ``v`` settles early: after an
uncompressed warm-up it is *frozen*, Adam becomes momentum SGD with a fixed per-coordinate preconditioner, and the
*momentum* can be compressed with error feedback without changing what Adam converges to.

Per step ``t`` with local gradient ``g_i`` on worker ``i`` (weight decay as L2: ``g_i += wd * theta``):

- warm-up, ``t <= T_w`` (``freeze_step``): ``g = mean_i g_i`` (float32 allreduce), then exactly Adam
  (``torch.optim.Adam``'s arithmetic; 1-bit LAMB: exactly ``datkit.optim.LALR(base="adam")``'s);
- after: ``m_i = b1 * m + (1 - b1) * g_i`` on every worker; ``v`` stays ``v_{T_w}``, so ``d = sqrt(v / (1 - b2^T_w))
  + eps`` is the same on every worker; ``u = C(mean_i m_i / d)`` by the sharded exchange of ``datkit.compress`` with
  the 1-bit codec (sign + l1 scale per block of ``block_size``) and error feedback on the worker *and* the server
  side; ``m = u * d``; the update is Adam's ``theta -= lr / (1 - b1^t) * u`` (LAMB: the direction
  ``u / (1 - b1^t) + wd * theta`` gets LALR's per-tensor trust ratio ``tau(||theta||) * lr / ||direction||``).

Departure from the paper, on purpose: Tang et al. compress ``m`` itself. Because ``d`` is frozen and shared, the
map ``m -> m / d`` is linear and the same on every worker, so exchanging ``m / d`` is the same average when nothing
is lost; but the codec's error (every coordinate of a block gets ``+-`` the block's mean magnitude) then lands in
*update* units, where Adam bounds it, instead of gradient units divided by ``d``: a coordinate whose variance froze
at ~0 would otherwise turn the block's scale into a step of ``lr * scale / eps``. And a second one: a unit that
never fired during the warm-up froze with ``v = 0``; when it fires later, even uncompressed frozen-variance Adam steps
by ``lr * m / eps`` (the test model diverged at the first compressed step, with 8,805 of 32,768 weights of one
layer at ``v = 0`` after a 2-step warm-up). ``variance_floor`` (default 0.01) floors each tensor's frozen
``v_hat`` at that fraction of its mean; 0 gives Tang et al.'s update.

Every worker ends the exchange with the same ``m``, so the weights stay identical without any weight traffic. The
bytes per step after the warm-up: about ``2 (M-1)/M * n / 8`` plus 4 bytes per block, against ``2 (M-1)/M * 4n``
for the float32 allreduce (1/32 + scales: ~0.032 at the default block of 1024).

``freeze_step``: optimizer steps of warm-up; a value in (0, 1) is a fraction of the run's steps (``plan``).
Checkpoints: the per-parameter state (step, ``exp_avg``, frozen ``exp_avg_sq``) is the same on every worker and
goes into ``state_dict``; the error-feedback residuals differ per worker and go through ``exchange_state``
(``datkit.optim.communicating``), so a resumed run continues exactly.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from datkit.compress import OneBit

from .communicating import Exchange
from .lalr import ExcludeSpec, _exclude_fn, trust_ratio_step


class OnebitAdam(torch.optim.Optimizer):
    """1-bit Adam (see the module docstring); ``lamb=True`` is 1-bit LAMB over LALR's trust ratio.

    Args:
        params: parameters or param groups.
        lr, betas, eps, weight_decay: Adam's (weight decay as L2 in the gradient, as ``torch.optim.Adam``;
            LAMB folds it into the direction, as LALR).
        freeze_step: warm-up steps before the variance freezes (>= 1), or a fraction of the run in (0, 1).
        block_size: elements per scale of the 1-bit codec (multiple of 8).
        error_feedback: keep worker- and server-side residuals (False: plain scaled signs, for comparison).
        variance_floor: after the freeze, each tensor's variance is floored at this fraction of its mean (0: none).
        lamb, c_l, c_u, exclude: 1-bit LAMB's trust ratio ``tau = min(max(||theta||, c_l), c_u)``, tensors that
            skip it (LALR's ``exclude``).
    """

    communicates = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, freeze_step: float = 0.25, block_size: int = 1024,
                 error_feedback: bool = True, lamb: bool = False, c_l: float = 0.0, c_u: float = 10.0,
                 exclude: ExcludeSpec = "bias_and_norm", variance_floor: float = 0.01) -> None:
        if lr <= 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr={lr} must be > 0, eps={eps} and weight_decay={weight_decay} >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas={tuple(betas)} must be in [0, 1)")
        if variance_floor < 0:
            raise ValueError(f"variance_floor={variance_floor} must be >= 0")
        if not freeze_step > 0 or (freeze_step >= 1 and freeze_step != int(freeze_step)):
            raise ValueError(f"freeze_step={freeze_step} must be a whole number of steps >= 1 or a fraction in (0, 1)")
        _exclude_fn(exclude)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, c_l=c_l, c_u=c_u,
                                      exclude=exclude))
        self.freeze_step = freeze_step
        self.freeze_at = int(freeze_step) if freeze_step >= 1 else None  # resolved by ``plan`` for a fraction
        self.lamb, self.variance_floor = lamb, variance_floor
        self.codec = OneBit(block_size=block_size, error_feedback=error_feedback)
        self.exchange: Exchange | None = None

    # --- the seam (datkit.optim.communicating) -------------------------------------------------------
    def attach(self, exchange: Exchange) -> None:
        """Reduce over the workers of ``exchange`` (without one: a single worker)."""
        self.exchange = exchange

    def plan(self, total_steps: int) -> None:
        """Resolve a fractional ``freeze_step`` against the run's ``total_steps`` optimizer steps."""
        if self.freeze_step < 1:
            self.freeze_at = max(1, math.ceil(self.freeze_step * total_steps))

    def exchange_state(self) -> dict[str, Any]:
        """This worker's error-feedback residuals (they differ per worker)."""
        return self.codec.local_state()

    def load_exchange_state(self, state: dict[str, Any]) -> None:
        self.codec.load_local_state(state)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer``'s, plus the step at which the variance froze (or will freeze)."""
        return {**super().state_dict(), "freeze_at": self.freeze_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state; a variance that had already frozen stays frozen at the same step (a run resumed with
        more epochs must not re-plan a fractional ``freeze_step`` past it)."""
        saved = state_dict.get("freeze_at")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "freeze_at"})
        steps = [int(st.get("step", 0)) for st in self.state.values()]
        if saved is not None and steps and max(steps) > int(saved):
            self.freeze_at = int(saved)

    def frozen(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) runs with the frozen variance and the compressed momentum."""
        if self.freeze_at is None:
            raise RuntimeError("OnebitAdam: freeze_step is a fraction of the run; call plan(total_steps) first")
        return step > self.freeze_at

    # --- the step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for k, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            t = self.state[params[0]]["step"]
            if self.frozen(t):
                self._compressed_step(params, group, t, key=f"group{k}")
            else:
                self._warmup_step(params, group, t)
        return loss

    def _reduce_flat(self, tensors: list[torch.Tensor],
                     reduce: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` concatenated into one flat vector, ``reduce``d over the workers, cut back into their shapes
        (views of the result)."""
        flat = reduce(torch.cat([t.reshape(-1) for t in tensors]))
        return [c.view_as(t) for c, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def _many_workers(self) -> bool:
        return self.exchange is not None and self.exchange.world_size > 1

    def _warmup_step(self, params: list[torch.Tensor], group: dict[str, Any], t: int) -> None:
        grads = [p.grad for p in params]
        if self._many_workers():  # one float32 allreduce of every gradient
            torch._foreach_copy_(grads, self._reduce_flat(grads, self.exchange.mean))
        b1, b2 = group["betas"]
        for p, g in zip(params, grads):
            state = self.state[p]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            if self.lamb:  # LALR(base="adam")'s arithmetic
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                u = (m / (1 - b1 ** t)).div_((v / (1 - b2 ** t)).sqrt_().add_(group["eps"]))
                self._lamb_update(p, u, group)
                continue
            if group["weight_decay"]:  # torch.optim.Adam's arithmetic (single-tensor path)
                g = g.add(p, alpha=group["weight_decay"])
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g.conj(), value=1 - b2)
            denom = (v.sqrt() / ((1 - b2 ** t) ** 0.5)).add_(group["eps"])
            p.addcdiv_(m, denom, value=-group["lr"] / (1 - b1 ** t))

    def _compressed_step(self, params: list[torch.Tensor], group: dict[str, Any], t: int, key: str) -> None:
        b1, b2 = group["betas"]
        wd = group["weight_decay"]
        moms = [self.state[p]["exp_avg"] for p in params]
        denoms = [self._frozen_denominator(self.state[p]["exp_avg_sq"], group) for p in params]
        for p, m in zip(params, moms):
            g = p.grad.add(p, alpha=wd) if wd and not self.lamb else p.grad
            m.lerp_(g, 1 - b1)  # this worker's momentum
        dirs = [m / d for m, d in zip(moms, denoms)]  # in the frozen preconditioner's coordinates
        if self._many_workers():
            dirs = self._reduce_flat(dirs, lambda flat: self.exchange.compressed_mean(self.codec, flat, key))
            torch._foreach_copy_(moms, torch._foreach_mul(dirs, denoms))  # the momentum every worker now shares
        for p, u in zip(params, dirs):
            if self.lamb:
                self._lamb_update(p, u.div(1 - b1 ** t), group)
            else:
                p.add_(u, alpha=-group["lr"] / (1 - b1 ** t))

    def _frozen_denominator(self, v: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """``d = sqrt(max(v_hat, floor * mean(v_hat))) + eps`` with ``v_hat = v / (1 - b2^T_w)``, the variance frozen
        at step ``T_w``; the floor (``variance_floor``, per tensor) keeps a coordinate whose variance froze at ~0 (a
        unit that never fired during the warm-up, then fires) from a step of ``lr * m / eps``."""
        v_hat = v / (1 - group["betas"][1] ** self.freeze_at)
        if self.variance_floor > 0 and v_hat.numel():
            v_hat = v_hat.clamp(min=float(v_hat.mean()) * self.variance_floor)
        return v_hat.sqrt_().add_(group["eps"])

    @staticmethod
    def _lamb_update(p: torch.Tensor, u: torch.Tensor, group: dict[str, Any]) -> None:
        """LALR's per-tensor step along ``u + wd * theta`` (``datkit.optim.lalr.trust_ratio_step``)."""
        if group["weight_decay"]:
            u.add_(p, alpha=group["weight_decay"])
        trust_ratio_step(p, u, group["lr"], group["c_l"], group["c_u"], _exclude_fn(group["exclude"])(p))

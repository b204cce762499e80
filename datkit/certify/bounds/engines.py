"""Bound engines behind certified training and verified accuracy (config ``bounds.engine``).

- ``native``: datkit's own IBP / CROWN-IBP (this package); the default, needs nothing else.
- ``auto_lirpa``: the auto_LiRPA library (Xu et al., NeurIPS 2020), which Shi et al. 2021 built on, used
  when it is importable (a user may have installed it from source); otherwise :func:`require_engine`
  fails with a message that says so. See :mod:`.lirpa`.

Both return a :class:`Margins`: lower bounds of the margins ``f_y - f_j`` and, for the warm-up
regularizers, the intervals of every ReLU's pre-activation and of the normalized input.
:func:`certified_fused_loss` (``bounds.loss_fusion``, CROWN-IBP) bounds the cross-entropy itself
(:mod:`.loss_fusion`); only the native engine has it (the config check refuses it with ``auto_lirpa``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .api import Margins, margin_bounds  # Margins: re-exported
from .core import Interval
from .lirpa import lirpa_margins, require_auto_lirpa
from .loss_fusion import fused_loss

ENGINES = ("native", "auto_lirpa")


def require_engine(engine: str) -> None:
    """Raise ``ValueError`` for an unknown engine, ``ImportError`` (with what to do) for one not installed."""
    if engine not in ENGINES:
        raise ValueError(f"bounds.engine={engine!r} is not one of: {', '.join(ENGINES)}")
    if engine == "auto_lirpa":
        require_auto_lirpa()


def certified_margins(engine: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str, *,
                      beta: float = 1.0, batch_stats: dict | None = None, num_classes: int | None = None) -> Margins:
    """Margin lower bounds of ``model`` (unwrapped) at ``(x, y)`` over the eps-box by ``method`` (ibp / crown-ibp)."""
    if engine == "native":
        res = margin_bounds(model, x, y, eps, method, beta=beta, batch_stats=batch_stats, num_classes=num_classes)
        return Margins(res.lower, res.state.relu_inputs(), res.state.network_input())
    require_engine(engine)
    return lirpa_margins(model, x, y, eps, method, beta=beta, num_classes=num_classes)


@dataclass
class FusedMargins:
    """What certified training reads from a fused bound: the loss bound and the regularizers' intervals."""

    loss: torch.Tensor
    relu_inputs: list[Interval]
    network_input: Interval


def certified_fused_loss(engine: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                         beta: float = 1.0, batch_stats: dict | None = None,
                         num_classes: int | None = None) -> FusedMargins:
    """The loss-fusion bound of the robust cross-entropy (:func:`~.loss_fusion.fused_loss`); native engine only."""
    if engine != "native":
        raise ValueError(f"bounds.loss_fusion=true needs bounds.engine=native (got {engine!r}): "
                         "set bounds.loss_fusion=false")
    res = fused_loss(model, x, y, eps, beta, batch_stats=batch_stats, num_classes=num_classes)
    return FusedMargins(res.loss, res.state.relu_inputs(), res.state.network_input())

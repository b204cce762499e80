"""Public functions of the native bound engine.

Every function bounds the model's outputs over the l_inf ball of radius ``eps`` around ``x``
intersected with the pixel range: ``{x' : |x' - x|_inf <= eps} ∩ [0, 1]^d`` (inputs in [0, 1]; the
model normalizes internally, see :class:`~datkit.models.NormalizedModel`). ``eps`` is in pixel units.

- :func:`ibp_bounds`: interval bound propagation (Gowal et al. 2018);
- :func:`crown_ibp_bounds`: CROWN-IBP (Zhang et al., ICLR 2020), the backward linear bound of CROWN
  with IBP bounds for every intermediate ReLU;
- :func:`margin_bounds`: lower bounds of the margins ``f_y(x') - f_j(x')`` (``j != y``), i.e. of
  ``C f(x')`` for the specification matrix :func:`spec_matrix`; CROWN-IBP's training bound mixes
  ``beta * CROWN-IBP + (1 - beta) * IBP`` as in Zhang et al. 2020 and Shi et al. 2021;
- :func:`~.crown.crown_bounds`: full CROWN (Zhang et al. 2018), intermediate bounds by CROWN too (:mod:`.crown`);
- :func:`~.crown.verified`: which examples are certified (every margin's lower bound > 0).

BatchNorm layers in training mode use the statistics of the clean batch (``batch_stats`` from
:func:`~datkit.certify.bounds.batchnorm.record_batch_stats`; when omitted, a clean forward pass
records them and the running statistics are restored afterwards).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .batchnorm import Stats, clean_batch_stats, needs_batch_stats
from .core import Interval, UnsupportedLayer
from .graph import graph_of
from .propagate import BoundState, backward_pass, ibp_pass

BOUND_METHODS = ("ibp", "crown-ibp")  # training bounds (margin_bounds)


@dataclass
class Margins:
    """Lower bounds of the margins ``(B, classes - 1)``, ReLU pre-activation intervals, normalized input box
    (what a bound engine gives certified training, ``datkit.certify.bounds.engines``)."""

    lower: torch.Tensor
    relu_inputs: list[Interval]
    network_input: Interval


def input_box(x: torch.Tensor, eps: float) -> Interval:
    """``[max(x - eps, 0), min(x + eps, 1)]``: the l_inf ball of radius ``eps`` within the pixel range."""
    return Interval((x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0))


def spec_matrix(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``C`` of shape ``(B, num_classes - 1, num_classes)`` with rows ``e_y - e_j`` for every ``j != y``."""
    eye = torch.eye(num_classes, device=y.device)
    others = torch.arange(num_classes, device=y.device).expand(len(y), -1)
    others = others[others != y.unsqueeze(1)].view(len(y), num_classes - 1)
    return eye[y].unsqueeze(1) - eye[others]


def num_classes_of(model: nn.Module) -> int:
    """The number of logits, read from the model's last layer when it is a Linear."""
    graph = graph_of(model)
    step = next(s for s in graph.steps if s.name == graph.output_name)
    module = model.get_submodule(step.target) if step.op == "call_module" else None
    if not isinstance(module, nn.Linear):
        raise UnsupportedLayer("datkit.certify: cannot read the number of classes from the model (its last layer is "
                               "not a Linear): pass num_classes=")
    return module.out_features


def bound_state(model: nn.Module, x: torch.Tensor, eps: float, C: torch.Tensor | None = None,
                batch_stats: Stats | None = None) -> BoundState:
    """The IBP pass: intervals of every layer of ``model`` over the input box (see the module docstring)."""
    if batch_stats is None and needs_batch_stats(model):
        batch_stats = clean_batch_stats(model, x)
    return ibp_pass(model, graph_of(model), input_box(x, eps), C, batch_stats)


def ibp_bounds(model: nn.Module, x: torch.Tensor, eps: float, C: torch.Tensor | None = None, *,
               batch_stats: Stats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """IBP bounds ``(lower, upper)`` of the logits, or of ``C @ logits`` when ``C`` (B, K, classes) is given."""
    out = bound_state(model, x, eps, C, batch_stats).output
    return out.lower, out.upper


def crown_ibp_bounds(model: nn.Module, x: torch.Tensor, eps: float, C: torch.Tensor | None = None, *,
                     batch_stats: Stats | None = None, upper: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CROWN-IBP bounds ``(lower, upper)`` of the logits, or of ``C @ logits``; ``upper=False`` skips the upper one."""
    state = bound_state(model, x, eps, None, batch_stats)
    if C is None:
        n = state.values[state.graph.output_name].lower.shape[-1]
        C = torch.eye(n, dtype=x.dtype, device=x.device).expand(len(x), n, n)
    lower = backward_pass(state, C)
    return lower, (-backward_pass(state, -C) if upper else None)


@dataclass
class MarginBounds:
    """Lower bounds of the margins ``(B, classes - 1)`` and the IBP state (intervals of every layer)."""

    lower: torch.Tensor
    state: BoundState


def margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str = "ibp", *,
                  beta: float = 1.0, batch_stats: Stats | None = None, num_classes: int | None = None) -> MarginBounds:
    """Lower bounds of ``f_y - f_j`` (``j != y``) over the input box by ``method`` (``ibp`` or ``crown-ibp``).

    ``crown-ibp`` returns ``beta * CROWN-IBP + (1 - beta) * IBP`` (``beta = 0`` skips the backward pass).
    """
    if method not in BOUND_METHODS:
        raise ValueError(f"method must be one of {', '.join(BOUND_METHODS)}; got {method!r}")
    C = spec_matrix(y, num_classes or num_classes_of(model)).to(x.dtype)
    state = bound_state(model, x, eps, C, batch_stats)
    lower = state.output.lower
    if method == "crown-ibp" and beta > 0:
        lower = beta * backward_pass(state, C) + (1.0 - beta) * lower
    return MarginBounds(lower, state)

"""Full CROWN bounds: CROWN's backward linear bound with CROWN (not IBP) bounds for every intermediate ReLU.

CROWN (Zhang et al. 2018, "Efficient Neural Network Robustness Certification with General Activation
Functions", NeurIPS) bounds a network ``f`` over the input box ``X = {x' : |x' - x|_inf <= eps} ∩ [0, 1]^d``
(inputs in [0, 1], ``eps`` in pixel units) by relaxing every ReLU on an interval ``[l, u]`` of its
pre-activation ``h`` (``alpha h <= relu(h) <= u/(u-l) (h - l)`` where ``l < 0 < u``, with the adaptive
``alpha = 1 if u > -l else 0``, :mod:`.rules_relu`) and pushing ``A`` back to the input:

    A f(x') >= Lambda x' + bias  for all x' in X,   so   min_X A f >= Lambda center - |Lambda| radius + bias.

CROWN-IBP takes ``[l, u]`` from IBP. Full CROWN computes them with the same backward pass, in topological
order: for each ReLU's pre-activation ``h = g(x')`` the rows ``+e_j`` and ``-e_j`` are pushed back from ``g``
(:func:`~.propagate.backward_pass` started at that step) with the already-refined intervals of the earlier
ReLUs, and ``[l_j, u_j]`` becomes ``[max(l_ibp, l_crown), min(u_ibp, u_crown)]`` (both are sound, so is their
intersection). As in auto_LiRPA / alpha-CROWN only neurons that are *unstable* (``l < 0 < u``) under the current
bounds get rows (a stable neuron's relaxation is exact whatever its bounds): examples are bounded in groups of
:data:`GROUP`, the rows of one layer are the neurons unstable for some example of the group, in chunks of at
most ``max_rows`` rows (``group x neurons x 2``) per backward pass, which bounds the memory. Pre-activations that
IBP bounds exactly (an affine function of the box through one coordinate-mixing layer: the first convolution)
are not refined.

The final bound is the backward pass from the output (or ``C @ output``) with the refined intervals, then the
element-wise max with the CROWN-IBP lower bound (min with its upper bound): with the adaptive lower slope a
tighter interval can flip ``alpha``, so only this guarantees **no looser than CROWN-IBP**. Meant for
evaluation (eval mode); train-mode BatchNorm uses ``batch_stats`` like the other bound functions.
"""
from __future__ import annotations

import torch
from torch import nn

from .api import bound_state, margin_bounds, num_classes_of, spec_matrix
from .batchnorm import Stats, clean_batch_stats, needs_batch_stats
from .core import Interval
from .propagate import BoundState, backward_pass
from .rules_affine import AvgPoolRule, Conv2dRule, LinearRule
from .rules_relu import ReLURule

VERIFY_BOUND_METHODS = ("ibp", "crown-ibp", "crown")  # bounds of verified()
DEFAULT_MAX_ROWS = 4096  # rows (batch x neurons x 2) of one intermediate backward pass
GROUP = 1  # examples bounded together: the rows are the neurons unstable for ANY of them (measured on an IBP-trained
# CNN-7 at eps 0.3: 2.4 s for one example, 31.9 s for a group of 4, as the union of unstable neurons grows)


def relu_input_names(state: BoundState) -> list[str]:
    """The steps whose outputs feed a ReLU (pre-activations), in topological order, each once, except those that IBP
    already bounds exactly: an affine function of the input box through at most one layer that mixes coordinates
    (Linear, Conv2d, pooling; per-channel maps such as Normalize and BatchNorm compose exactly), e.g. the first
    convolution's pre-activations, which are most of a CNN's unstable neurons and where CROWN would change nothing."""
    steps = {s.name: s for s in state.steps}
    mixing: dict[str, int] = {}  # per step: the most coordinate-mixing layers on a ReLU-free path from the input, or
    for step in state.steps:     # a large number once a ReLU lies on some path
        ins = [mixing[n] for n in step.inputs if n in mixing]
        here = max(ins, default=0)
        if isinstance(step.rule, ReLURule):
            here = 1 << 20
        elif isinstance(step.rule, (LinearRule, Conv2dRule, AvgPoolRule)):
            here += 1
        mixing[step.name] = here
    feeding = {s.args[0].name for s in state.steps if isinstance(s.rule, ReLURule)}
    return [n for n in steps if n in feeding and mixing[n] > 1]


def refine_interval(state: BoundState, name: str, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Replace step ``name``'s interval by its CROWN bounds intersected with it, for the neurons unstable for
    some example (the others keep theirs); returns how many neurons got rows."""
    iv = state.values[name]
    lower, upper = iv.lower.flatten(1), iv.upper.flatten(1)
    rows = ((lower < 0) & (upper > 0)).any(0).nonzero().squeeze(1)
    if len(rows) == 0:
        return 0
    batch, shape = lower.shape[0], iv.shape[1:]
    new_lower, new_upper = lower.clone(), upper.clone()
    for idx in rows.split(max(1, max_rows // (2 * batch))):
        k = len(idx)
        A = torch.zeros(batch, 2 * k, lower.shape[1], dtype=lower.dtype, device=lower.device)
        r = torch.arange(k, device=lower.device)
        A[:, r, idx], A[:, k + r, idx] = 1.0, -1.0  # rows +e_j (lower bound of h_j) and -e_j (of -h_j)
        bound = backward_pass(state, A.view(batch, 2 * k, *shape), start=name)
        new_lower[:, idx] = torch.maximum(new_lower[:, idx], bound[:, :k])
        new_upper[:, idx] = torch.minimum(new_upper[:, idx], -bound[:, k:])
    refined = Interval(new_lower.view(iv.shape), new_upper.view(iv.shape))
    state.values[name] = refined
    for step in state.steps:  # the ReLUs it feeds: their backward rule reads relu(u) from their own interval
        if isinstance(step.rule, ReLURule) and step.args[0].name == name:
            state.values[step.name] = step.rule.ibp(step, [refined], state)
    return len(rows)


def refine_relu_inputs(state: BoundState, max_rows: int = DEFAULT_MAX_ROWS) -> None:
    """Every ReLU pre-activation interval of ``state`` by CROWN ∩ IBP, in topological order (module docstring)."""
    for name in relu_input_names(state):
        refine_interval(state, name, max_rows)


def crown_bounds(model: nn.Module, x: torch.Tensor, eps: float, C: torch.Tensor | None = None, *,
                 batch_stats: Stats | None = None, upper: bool = True, max_rows: int = DEFAULT_MAX_ROWS
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full CROWN bounds ``(lower, upper)`` of the logits, or of ``C @ logits`` (``C``: ``(B, K, classes)``), over
    ``{x' : |x'-x|_inf <= eps} ∩ [0,1]^d``; never looser than CROWN-IBP (element-wise max / min with it).
    ``upper=False`` skips the upper bound; ``max_rows`` caps the rows of one intermediate backward pass."""
    if batch_stats is None and needs_batch_stats(model):
        batch_stats = clean_batch_stats(model, x)  # of the whole batch, whatever the groups
    if C is None:
        n = num_classes_of(model)
        C = torch.eye(n, dtype=x.dtype, device=x.device).expand(len(x), n, n)
    spec = torch.cat([C, -C], 1) if upper else C
    bounds = []
    for i in range(0, len(x), GROUP):  # a few examples at a time: each gets rows for its own unstable neurons
        state = bound_state(model, x[i:i + GROUP], eps, None, batch_stats)
        crown_ibp = backward_pass(state, spec[i:i + GROUP])
        refine_relu_inputs(state, max_rows)
        bounds.append(torch.maximum(backward_pass(state, spec[i:i + GROUP]), crown_ibp))
    bound, k = torch.cat(bounds), C.shape[1]
    return bound[:, :k], (-bound[:, k:] if upper else None)


@torch.no_grad()
def verified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str = "ibp",
             num_classes: int | None = None) -> torch.Tensor:
    """Boolean ``(B,)``: every margin's lower bound is positive. ``crown-ibp`` certifies an example when
    either IBP or CROWN-IBP does, ``crown`` when IBP or full CROWN (itself >= CROWN-IBP) does (all are sound)."""
    if method not in VERIFY_BOUND_METHODS:
        raise ValueError(f"method must be one of {', '.join(VERIFY_BOUND_METHODS)}; got {method!r}")
    res = margin_bounds(model, x, y, eps, "ibp", num_classes=num_classes)
    lower = res.lower
    if method != "ibp":
        C = spec_matrix(y, lower.shape[1] + 1).to(x.dtype)
        if method == "crown":
            lower = torch.maximum(lower, crown_bounds(model, x, eps, C, batch_stats=res.state.batch_stats or None,
                                                      upper=False)[0])
        else:
            lower = torch.maximum(lower, backward_pass(res.state, C))
    return (lower > 0).all(dim=1)

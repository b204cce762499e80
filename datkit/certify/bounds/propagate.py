"""The two passes of the engine over a :class:`~datkit.certify.bounds.graph.BoundGraph`.

- :func:`ibp_pass`: interval bound propagation (Gowal et al. 2018) from the input box through every
  step, keeping every step's interval (CROWN-IBP's intermediate bounds, the regularizers' inputs).
  With a specification matrix ``C`` the last layer, when it is linear, is merged with ``C`` (bounds of
  ``C W h + C b`` rather than ``C`` times the logits' box), as in IBP / CROWN-IBP training.
- :func:`backward_pass`: the backward linear bound of CROWN (Zhang et al. 2018) from ``C`` (rows) at the
  output (or at any step) to the input, with every ReLU relaxed on its IBP interval: CROWN-IBP (Zhang et al., ICLR
  2020). The bound is concretized on the input box: ``A x + c >= A center - |A| radius + c``. A BatchNorm
  that is the only consumer of a Linear/Conv is folded into it in both passes (one affine map; the folded
  weight and bias are computed once per state).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .batchnorm import BatchNormRule
from .core import Interval, UnsupportedLayer
from .graph import BoundGraph, Ref, Step
from .rules_affine import AffineRule, LinearRule, NormalizeRule, folded
from .rules_relu import ReLURule


def _resolve(args: Any, values: dict[str, Any]) -> Any:
    return fx.node.map_aggregate(args, lambda a: values[a.name] if isinstance(a, Ref) else a)


class BoundState:
    """The result of an IBP pass: every step's interval (or shape value) and per-step caches."""

    def __init__(self, graph: BoundGraph, steps: list[Step], batch_stats: dict | None) -> None:
        self.graph, self.steps = graph, steps
        self.batch_stats = batch_stats or {}
        self.values: dict[str, Any] = {}
        self.cache: dict[str, Any] = {}
        self.output: Interval | None = None  # of the logits, or of C @ logits when a spec was given

    def interval(self, name: str) -> Interval:
        return self.values[name]

    def shape(self, name: str) -> torch.Size:
        return self.values[name].shape

    def kwargs(self, step: Step) -> dict[str, Any]:
        return _resolve(step.kwargs, self.values) if step.kwargs else {}

    @property
    def input(self) -> Interval:
        """The input box (pixel space)."""
        return self.values[self.graph.input_name]

    def network_input(self) -> Interval:
        """The box after the in-model normalization (the input itself when the model has none)."""
        for step in self.steps:
            if step.rule is not None and isinstance(step.rule, NormalizeRule):
                return self.values[step.name]
        return self.input

    def relu_inputs(self) -> list[Interval]:
        """Intervals of the pre-activations of every ReLU, in graph order."""
        return [self.values[s.args[0].name] for s in self.steps if isinstance(s.rule, ReLURule)]


def _batchnorm_after(graph: BoundGraph, steps: list[Step], i: int, args: Any) -> Step | None:
    """The BatchNorm step that is the only consumer of Linear/Conv step ``i`` (channels on dimension 1), or None."""
    step = steps[i]
    if not isinstance(step.rule, AffineRule) or i + 1 >= len(steps):
        return None
    nxt = steps[i + 1]
    if not isinstance(nxt.rule, BatchNormRule) or graph.consumers[step.name] != [nxt.name]:
        return None
    if isinstance(step.rule, LinearRule) and len(args[0].shape) != 2:
        return None
    return nxt


def _folded(state: BoundState, layer: Step, bn: Step) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``layer`` followed by BatchNorm ``bn`` as one affine map, computed once per state (the IBP
    pass and the backward pass share them)."""
    key = ("folded", bn.name)
    if key not in state.cache:
        state.cache[key] = folded(layer.module.weight, layer.module.bias, *bn.rule.affine(bn, state))
    return state.cache[key]


def ibp_pass(model: nn.Module, graph: BoundGraph, box: Interval, C: torch.Tensor | None = None,
             batch_stats: dict | None = None) -> BoundState:
    """Intervals of every step of ``model`` for inputs in ``box``; ``state.output`` bounds ``C @ logits`` if given."""
    steps = graph.bind(model)
    state = BoundState(graph, steps, batch_stats)
    fused: set[str] = set()
    for i, step in enumerate(steps):
        if step.op == "placeholder":
            state.values[step.name] = box
            continue
        if step.name in fused:
            continue
        args = _resolve(step.args, state.values)
        if (step.name == graph.output_name and C is not None and isinstance(step.rule, LinearRule)
                and len(args[0].shape) == 2):
            state.output = step.rule.ibp_spec(step, args[0], C)
            state.values[step.name] = state.output
            return state
        bn = _batchnorm_after(graph, steps, i, args)
        if bn is not None:  # layer + BatchNorm as one affine map (the layer's own interval is not needed)
            state.values[bn.name] = step.rule.ibp_with(step, args[0], *_folded(state, step, bn))
            fused.add(bn.name)
            continue
        state.values[step.name] = step.rule.ibp(step, args, state)
    out = state.values[graph.output_name]
    if C is not None:
        out = Interval.from_center_radius((C @ out.center.unsqueeze(-1)).squeeze(-1),
                                          (C.abs() @ out.radius.unsqueeze(-1)).squeeze(-1))
    state.output = out
    return state


def _batchnorms_after_layers(state: BoundState) -> dict[str, Step]:
    """``{BatchNorm step name: the Linear/Conv step it is the only consumer of}`` (see :func:`_batchnorm_after`)."""
    out = {}
    for i, step in enumerate(state.steps):
        if isinstance(step.rule, AffineRule) and step.op != "placeholder":
            shapes = [state.values[a.name] for a in step.args if isinstance(a, Ref)]
            bn = _batchnorm_after(state.graph, state.steps, i, shapes)
            if bn is not None:
                out[bn.name] = step
    return out


def backward_pass(state: BoundState, C: torch.Tensor, start: str | None = None) -> torch.Tensor:
    """CROWN lower bound of ``C @ value`` (shape ``(batch, rows)``) using the intervals of ``state``: of the logits,
    or of step ``start``'s output when given (``C`` is then ``(batch, rows, *shape of that output[1:])``; full CROWN
    bounds intermediate layers this way, :mod:`.crown`)."""
    graph = state.graph
    start = start or graph.output_name
    if start == graph.output_name and len(state.values[start].shape) != 2:
        raise UnsupportedLayer("datkit.certify: CROWN-IBP needs logits of shape (batch, classes)")
    pending: dict[str, torch.Tensor] = {start: C}
    bias = torch.zeros(C.shape[:2], dtype=C.dtype, device=C.device)
    lower = None
    bn_layers = _batchnorms_after_layers(state)
    for step in reversed(state.steps):
        A = pending.pop(step.name, None)
        if A is None:
            continue
        if step.name in bn_layers:  # BatchNorm after a Linear/Conv: both as one affine map (as the IBP pass does)
            layer = bn_layers[step.name]
            contributions, b = layer.rule.backward_with(layer, A, state, *_folded(state, layer, step))
            if b is not None:
                bias = bias + b
            ((name, A_in),) = contributions
            pending[name] = A_in if name not in pending else pending[name] + A_in
            continue
        if step.op == "placeholder":
            box = state.values[step.name]
            flat = A.flatten(2)
            lower = ((flat @ box.center.flatten(1).unsqueeze(-1)).squeeze(-1)
                     - (flat.abs() @ box.radius.flatten(1).unsqueeze(-1)).squeeze(-1))
            continue
        contributions, b = step.rule.backward(step, A, state)
        if b is not None:
            bias = bias + b
        for name, A_in in contributions:
            pending[name] = A_in if name not in pending else pending[name] + A_in
    if lower is None:
        raise UnsupportedLayer("datkit.certify: the output does not depend on the input")
    return lower + bias
